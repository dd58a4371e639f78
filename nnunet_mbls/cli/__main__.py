"""``python -m nnunet_mbls.cli``: the same as the ``nnunet-mbls`` console script."""

import sys

from . import main

sys.exit(main())
