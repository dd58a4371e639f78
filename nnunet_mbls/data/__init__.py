"""Dataset generators that write nnU-Net v2 raw datasets (``$nnUNet_raw/DatasetXXX_Name``).

- ``make_synthetic_dataset``: 2-D/3-D synthetic data built so that calibration matters.
- ``make_ch2_deepgm_dataset``: deep grey matter from the Colin27 T1 + AAL atlas (Debian ``mricron-data``).
- ``make_totalseg_abdomen_dataset``: abdominal CT from TotalSegmentator's example scan (PyPI sdist).
- ``write_msd_task``: any of them in the Medical Segmentation Decathlon layout (``TaskNN_Name``).
"""

from nnunet_mbls.data.ch2 import make_ch2_deepgm_dataset
from nnunet_mbls.data.msd import write_msd_task
from nnunet_mbls.data.synthetic import make_synthetic_dataset
from nnunet_mbls.data.totalseg import make_totalseg_abdomen_dataset

__all__ = ["make_ch2_deepgm_dataset", "make_synthetic_dataset", "make_totalseg_abdomen_dataset", "write_msd_task"]
