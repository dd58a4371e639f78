"""Conformal risk control on (calibrated) nnU-Net probabilities: guarantees a user can act on.

From labelled held-out cases, under exchangeability of those cases with the cases it is applied to:

- ``risk``: the finite-sample conformal risk control threshold (Angelopoulos et al., "Conformal Risk Control",
  ICLR 2024) and the split-conformal quantile, on loss curves over a fixed threshold grid;
- ``curves``: what a case contributes, per foreground label: histograms of the label's probability over the
  case's voxels and over its reference voxels (:class:`CaseCurves`), from which every mask's false-negative
  rate, false-discovery rate and volume at every grid threshold follow exactly;
- ``acceptance``: a case-acceptance threshold on a QC score with a Learn-then-Test guarantee on the failure rate
  among accepted cases;
- ``rules``: fitting all of them into ``conformal.json`` and applying it to a new case (masks, volume interval,
  acceptance).

Where the cases come from (a ``nnUNetv2_predict --save_probabilities`` folder with references, or trained folds)
is :mod:`nnunet_mbls.conformal`'s.
"""
