"""nnunet_mbls.benchmark.failure_inputs: bad per-case values are refused naming the argument, the value and the fix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_mbls.benchmark.failure import (
    aurc,
    auroc_failure,
    bootstrap_ci,
    default_tau,
    e_aurc,
    failure_labels,
    risk_coverage,
    summarise_failure_detection,
)


@pytest.mark.parametrize("call, pattern", [
    (lambda: aurc([0.1, 0.2], [0.1, 0.2, 0.3]), r"`score` has 3 values but `risk` has 2; pass one value per case"),
    (lambda: aurc([0.1, math.nan], [0.1, 0.2]), r"`risk` contains nan at case index 1 .*drop cases"),
    (lambda: e_aurc([0.1, 0.2], [0.1, math.inf]), r"`score` contains inf at case index 1"),
    (lambda: risk_coverage([], []), r"`risk` is empty"),
    (lambda: aurc([[0.1, 0.2]], [0.1, 0.2]), r"`risk` must be 1-D .*shape \(1, 2\)"),
    (lambda: auroc_failure([0.5, 95.0], [0.1, 0.2], 0.5), r"`dice` must lie in \[0, 1\]; case index 1 has 95.0; .*percentages"),
    (lambda: auroc_failure([0.5, math.nan], [0.1, 0.2], 0.5), r"`dice` contains nan at case index 1"),
    (lambda: auroc_failure([0.5, 0.6], [0.1], 0.5), r"`score` has 1 values but `dice` has 2"),
    (lambda: failure_labels([0.5], math.nan), r"`tau` must be finite; got nan"),
    (lambda: failure_labels([0.5], "high"), r"`tau` must be a number.*'high'"),
    (lambda: default_tau([0.5, math.nan]), r"`baseline_dice` contains nan"),
    (lambda: bootstrap_ci(np.mean, [1.0, 2.0], [1.0]), r"`arrays\[1\]` has 1 cases but `arrays\[0\]` has 2"),
    (lambda: bootstrap_ci(np.mean, [1.0], n_boot=0), r"`n_boot` must be a positive integer; got 0"),
    (lambda: bootstrap_ci(np.mean, [1.0], level=95), r"`level` must lie strictly between 0 and 1; got 95"),
    (lambda: bootstrap_ci(np.mean), r"at least one per-case array"),
    (lambda: summarise_failure_detection([0.5, 0.6], {"a": [0.1]}, 0.5), r"`scores\['a'\]` has 1 values but `dice` has 2"),
    (lambda: summarise_failure_detection([0.5, 0.6], {"a": [0.1, math.nan]}, 0.5), r"`scores\['a'\]` contains nan"),
])
def test_validation_names_argument_value_and_fix(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
