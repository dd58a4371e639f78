"""``nnunet-mbls conformal``: conformal masks, volume intervals and a case-acceptance rule with finite-sample
guarantees, fitted on labelled held-out cases of a model (the maths: :mod:`nnunet_mbls.calibration.conformal`).

``folder`` takes a ``nnUNetv2_predict --save_probabilities`` folder and its references; ``trained`` takes trained
folds (their out-of-fold validation cases, or a held-out calibration set predicted by the deployed ensemble);
``record`` fits and writes ``conformal.json`` from either.
"""
