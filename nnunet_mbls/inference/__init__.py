"""Prediction, probability and uncertainty maps, and per-case quality control (``nnunet-mbls predict``/``maps``).

``uncertainty`` (entropy, mutual information, fold Dice; pure torch/numpy), ``qc`` (case scores and the
flag rule, shared with the benchmark), ``maps`` (NIfTI writing in the input geometry) and ``predict`` (the
two commands, on nnU-Net's ``nnUNetPredictor``). The names below import nothing heavy (the CLI's choices).
"""

#: map kinds of ``--maps``
MAP_KINDS = ("probabilities", "confidence", "entropy", "mutual_information")
#: QC score -> True when higher values mean a more doubtful case
SCORE_DIRECTION = {"mean_entropy_fg": True, "mean_entropy_boundary": True, "mean_fold_dice": False}
