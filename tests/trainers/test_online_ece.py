"""nnunet_mbls.trainers.online_ece: the online foreground ECE of the validation batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch


IGNORE = 4  # the synthetic dataset's labels are 0..3; nnU-Net's ignore label is the next integer


def test_online_ece_excludes_ignored_voxels():
    from nnunet_mbls.trainers.online_ece import OnlineECE

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, 7, 5, generator=g) * 2
    target = torch.randint(0, 4, (2, 1, 6, 7, 5), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.3] = IGNORE
    ece = OnlineECE(num_classes=4)
    state = ece.batch_state(logits, target, ignore_label=IGNORE)
    ignored = (target == IGNORE).expand_as(logits)
    moved = logits.clone()
    moved[ignored] = torch.randn(int(ignored.sum()), generator=g) * 30
    np.testing.assert_array_equal(ece.batch_state(moved, target, ignore_label=IGNORE), state)
    # an ignored voxel counts like a background one (neither is scored in the foreground ECE) ...
    as_background = torch.where(target == IGNORE, 0, target)
    np.testing.assert_array_equal(ece.batch_state(logits, as_background, ignore_label=IGNORE), state)
    # ... and unlike a foreground one
    as_class_1 = torch.where(target == IGNORE, 1, target)
    assert not np.array_equal(ece.batch_state(logits, as_class_1, ignore_label=IGNORE), state)


def test_online_ece_equals_a_naive_foreground_ece_of_the_whole_batch():
    from nnunet_mbls.trainers.online_ece import OnlineECE

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 4, (3, 1, 5, 6), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = IGNORE
    # naive: every voxel of the batch whose label is foreground and not ignored, 15 bins (lower, upper]
    p = torch.softmax(logits, dim=1).movedim(1, -1).reshape(-1, 4).numpy()
    t = target.reshape(-1).numpy()
    keep = (t != 0) & (t != IGNORE)
    conf, hit = p[keep].max(axis=1), (p[keep].argmax(axis=1) == t[keep]).astype(float)
    gap = 0.0
    for b in range(15):
        lower, upper = b / 15, (b + 1) / 15
        in_bin = (conf > lower) & (conf <= upper)
        gap += abs(hit[in_bin].sum() - conf[in_bin].sum())
    online = OnlineECE(num_classes=4)
    assert online.ece_from_state(online.batch_state(logits, target, ignore_label=IGNORE)) == pytest.approx(
        gap / keep.sum(), rel=1e-6)
