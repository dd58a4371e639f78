"""nnunet-mbls: calibrated nnU-Net v2 training with Margin-based Label Smoothing (MbLS)."""

__version__ = "0.1.0"
