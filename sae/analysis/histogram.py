"""Per-feature histogram of non-zero activations with a fixed bin count, built in one streaming pass.

Each feature's range is [0, hi) with hi a power of two at least its running maximum. When a larger value
arrives, hi doubles (as often as needed) and neighbouring bins merge pairwise, which is exact: with
b = floor(v * bins / hi), doubling hi gives floor(b / 2). So the result equals np.histogram over the final
[0, hi] with `bins` bins, with no first pass to find the range and no per-token storage. The data fill
between half and all of the bins.
"""
from __future__ import annotations

import torch


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x (x > 0), in float64."""
    return torch.exp2(torch.ceil(torch.log2(x.double())))


class RunningHistogram:
    def __init__(self, n: int, bins: int, device):
        self.bins = bins
        self.hi = torch.zeros(n, dtype=torch.float64, device=device)  # 0 = the feature has not fired yet
        self.counts = torch.zeros((n, bins), dtype=torch.long, device=device)

    def add(self, feat: torch.Tensor, value: torch.Tensor) -> None:
        """Count non-zero `value`s of features `feat` (1-D tensors of equal length)."""
        if len(feat) == 0:
            return
        v = value.double()
        batch_max = torch.zeros_like(self.hi).scatter_reduce(0, feat, v, reduce="amax", include_self=True)
        grow = batch_max > self.hi
        if bool(grow.any()):
            idx = grow.nonzero().squeeze(1)
            new_hi = pow2_ceil(batch_max[idx])
            old_hi = self.hi[idx]
            had = old_hi > 0
            if bool(had.any()):
                rows = idx[had]
                factor = (new_hi[had] / old_hi[had]).unsqueeze(1)  # a power of two
                target = torch.floor(torch.arange(self.bins, device=v.device, dtype=torch.float64) / factor).long()
                merged = torch.zeros((len(rows), self.bins), dtype=torch.long, device=v.device)
                merged.scatter_add_(1, target.clamp(max=self.bins - 1), self.counts[rows])
                self.counts[rows] = merged
            self.hi[idx] = new_hi
        b = torch.floor(v * self.bins / self.hi[feat]).long().clamp(0, self.bins - 1)
        flat = feat * self.bins + b
        self.counts += torch.bincount(flat, minlength=self.counts.numel()).view_as(self.counts)

    def edges(self) -> torch.Tensor:
        """[n, bins + 1] bin edges (all zero for features that never fired)."""
        steps = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64, device=self.hi.device)
        return self.hi.unsqueeze(1) * steps
