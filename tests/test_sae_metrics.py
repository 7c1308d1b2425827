"""Each reconstruction/sparsity metric against its brute-force definition, over several batches."""
from __future__ import annotations

import math

import torch

from sae.base import fvu, geometric_median
from sae.metrics import LatentStats, ReconStats, density, l0


def brute(x, h):
    x, h = x.double(), h.double()
    n, d = x.shape
    mean = x.mean(0)
    err = sum(float(((x[i] - h[i]) ** 2).sum()) for i in range(n))
    var = sum(float(((x[i] - mean) ** 2).sum()) for i in range(n))
    cos = sum(float(x[i] @ h[i] / (x[i].norm() * h[i].norm())) for i in range(n)) / n
    ratio = sum(float(h[i].norm() / x[i].norm()) for i in range(n)) / n
    bias = sum(float(h[i] @ h[i]) for i in range(n)) / sum(float(x[i] @ h[i]) for i in range(n))
    return {"fvu": err / var, "mse": err / (n * d), "cosine": cos, "shrinkage": ratio, "relative_reconstruction_bias": bias}


def test_streaming_reconstruction_metrics_equal_the_definitions():
    torch.manual_seed(0)
    x = torch.randn(300, 7) * 3 + 5  # a large mean: FVU about zero would look far better than it is
    h = 0.8 * x + 0.3 * torch.randn_like(x)
    stats = ReconStats()
    for a, b in zip(x.split(64), h.split(64)):
        stats.update(a, b)
    got, want = stats.summary(), brute(x, h)
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-9), (k, got[k], v)
    assert math.isclose(got["explained_variance"], 1 - want["fvu"], rel_tol=1e-9)
    assert math.isclose(float(fvu(x.double(), h.double())), want["fvu"], rel_tol=1e-9)
    zero_based = float(((x - h) ** 2).sum() / (x ** 2).sum())
    assert zero_based < 0.5 * got["fvu"]  # the pitfall the definition avoids


def test_sparsity_metrics_equal_the_definitions():
    f = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    assert l0(f) == (2 + 1 + 2) / 3
    assert torch.equal(density(f), torch.tensor([1 / 3, 1 / 3, 1.0, 0.0], dtype=torch.float64))
    stats = LatentStats(4)
    stats.update_dense(f[:2])
    stats.update_dense(f[2:])
    s = stats.summary()
    assert math.isclose(s["l0"], 5 / 3)
    assert s["frac_dead"] == 0.25 and s["frac_alive"] == 0.75
    assert s["frac_dense"] == 0.75 and s["frac_above_1pct"] == 0.75


def test_geometric_median_resists_outliers():
    torch.manual_seed(0)
    x = torch.randn(200, 3) * 0.1 + torch.tensor([1.0, 2.0, 3.0])
    x[:20] = 1000.0  # 10% far outliers drag the mean, not the median
    m = geometric_median(x)
    assert (m - torch.tensor([1.0, 2.0, 3.0])).norm() < 0.1
    assert (x.mean(0) - torch.tensor([1.0, 2.0, 3.0])).norm() > 50
