from nnunet_mbls.trainers import *  # noqa: F401,F403  (re-export for nnUNet_extTrainer)
