"""nnunet_mbls.losses.spatial: the SVLS kernel equals the authors' values."""

from __future__ import annotations

import pytest

from nnunet_mbls.losses import svls_kernel


def test_svls_kernel_equals_the_authors_values():
    k = svls_kernel(1.0, 2)
    assert k[1, 1].item() == pytest.approx(0.5, abs=1e-4)
    for edge in (k[0, 1], k[1, 0], k[1, 2], k[2, 1]):
        assert edge.item() == pytest.approx(0.0778, abs=1e-4)
    for corner in (k[0, 0], k[0, 2], k[2, 0], k[2, 2]):
        assert corner.item() == pytest.approx(0.0472, abs=1e-4)
    k3 = svls_kernel(1.0, 3)
    assert k3.shape == (3, 3, 3) and k3.sum().item() == pytest.approx(1.0) and k3[1, 1, 1].item() == pytest.approx(0.5)
