"""Every default of nnunet-mbls with its reason, in one place (light to import: the command line reads it).

Measurements behind a default are in docs/BENCHMARKS.md, under the section named here.
"""

from __future__ import annotations

#: equal-width confidence bins of ECE and classwise ECE: the paper's (and its authors' code's) 15
N_BINS = 15
#: voxels the reported calibration metrics are computed on: "fg" (ground truth != 0) is the paper's
METRIC_REGION = "fg"
#: every voxel selection the metrics accept: fg, all (inside nnU-Net's crop box), boundary (a band around
#: label boundaries)
REGIONS = ("fg", "all", "boundary")
#: half-width in voxels of the boundary band (metrics and QC)
BOUNDARY_WIDTH = 2

#: voxels of the seeded uniform subsample T is fitted on: the fit then costs the same on a 2D toy fold and a
#: 3D CT fold, and 10^6 voxels put the fit's sampling noise far below the spread of T between folds
#: (docs/BENCHMARKS.md, "The calibration step")
MAX_VOXELS = 1_000_000
#: seed of that subsample (keys are drawn per case from (seed, case name))
SEED = 0
#: the fitted T is clipped to this range (a fold where every voxel is right drives T to the lower bound)
T_BOUNDS = (0.05, 20.0)
#: voxels T is fitted on
FIT_REGIONS = ("all", "fg")
FIT_REGION_VOXELS = {"all": "voxels inside nnU-Net's crop box", "fg": "foreground voxels (ground truth != 0)"}
FIT_REGION = "all"
#: why, as recorded in calibration.json
FIT_REGION_REASON = (
    "all (the default, measured: docs/BENCHMARKS.md 'Which voxels to fit T on'): on the demo's 40 out-of-fold cases "
    "fitting T on the foreground lowered the foreground ECE (stock nnU-Net 0.034 -> 0.028) but raised the ECE and NLL "
    "of all crop-box voxels, which is what users receive (0.0084 -> 0.0101, 0.0987 -> 0.1002)"
)

#: below this much ``.npz`` data, folder evaluation runs in this process instead of spawning workers: starting
#: a worker costs seconds of imports, more than it saves on small folders (docs/BENCHMARKS.md, "Parallel
#: evaluation")
PARALLEL_MIN_BYTES = 512 * 2**20

#: failure detection: a case fails when its Dice is below this percentile of the baseline trainer's Dice
TAU_PERCENTILE = 10.0
#: bytes of a validation case's statistics file (``validation_statistics/<case>.npz``) given to its temperature-fit
#: sample: up to this / (4 C + 10) voxels per case (C float32 log-probabilities, a float64 key, an int16 label). With
#: 2.25 MiB a 4-class case keeps 91 k voxels, a 16-class case 32 k, a 117-class case 5 k; pooled over a fold's
#: cases that is the MAX_VOXELS sample whenever a fold has enough cases (docs/BENCHMARKS.md, "Streaming statistics")
FIT_SAMPLE_BYTES = 9 * 2**18
#: voxels per case whose region logits a region-based model's statistics keep (logit float32 + target per region,
#: key float64): 2^17 keep a case's file near 1 MB for 3 regions; pooled, the fit's sample is at most MAX_VOXELS
REGION_SAMPLE = 2**17
#: bytes of a case's statistics file given to its stratified sample of metric-region voxels, from which the metrics
#: after T are estimated (exact when the region has fewer voxels): 1.25 MiB, so that the file stays under 5 MB
METRIC_SAMPLE_BYTES = 5 * 2**18
#: bytes of a case's statistics file given to the stratified sample of each region of the benchmark's per-case
#: scores (predicted foreground, predicted and reference boundary bands), from which their values after T are estimated
QC_SAMPLE_BYTES = 3 * 2**16
