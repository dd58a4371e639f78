"""Former home of folder evaluation, now :mod:`nnunet_mbls.calibration.evaluation`; its public names stay importable here."""

from nnunet_mbls.calibration.evaluation import *  # noqa: F401,F403
from nnunet_mbls.calibration.evaluation import __all__  # noqa: F401
