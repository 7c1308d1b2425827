"""Reconstruction and sparsity metrics (SAEBench "core" definitions), exact over many batches.

x is the target, x_hat the reconstruction, both in the same units (the trainer uses normalised units; FVU,
cosine, shrinkage and the bias are scale-invariant, MSE is reported in the units given).
- FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (about the mean, not zero); explained_variance = 1 - FVU
- MSE = mean over examples and dimensions of (x - x_hat)^2 (not scaled by batch size)
- cosine = mean_b cos(x_b, x_hat_b); shrinkage (l2_ratio) = mean_b ||x_hat_b|| / ||x_b||
- relative_reconstruction_bias = E||x_hat||^2 / E<x, x_hat>
- L0 = mean number of non-zero latents per example; density_i = fraction of examples where latent i fires
"""
from __future__ import annotations

import torch


class ReconStats:
    """Streaming sums (float64) so a metric over many batches equals the metric over their concatenation."""

    def __init__(self):
        self.n = 0
        self.d = 0
        self.sum_err = self.sum_sq = self.sum_cos = self.sum_ratio = self.sum_hat_sq = self.sum_dot = 0.0
        self.sum_x = None

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.d = x.shape[1]
        self.sum_err += float((x - x_hat).pow(2).sum())
        self.sum_sq += float(x.pow(2).sum())
        s = x.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        xn, hn = x.norm(dim=1), x_hat.norm(dim=1)
        dot = (x * x_hat).sum(1)
        self.sum_cos += float((dot / (xn * hn).clamp_min(1e-12)).sum())
        self.sum_ratio += float((hn / xn.clamp_min(1e-12)).sum())
        self.sum_hat_sq += float(hn.pow(2).sum())
        self.sum_dot += float(dot.sum())

    def summary(self) -> dict:
        if self.n == 0:
            return {}
        var = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        fvu = self.sum_err / max(var, 1e-30)
        return {"fvu": fvu, "explained_variance": 1.0 - fvu, "mse": self.sum_err / (self.n * self.d),
                "cosine": self.sum_cos / self.n, "shrinkage": self.sum_ratio / self.n,
                "relative_reconstruction_bias": self.sum_hat_sq / self.sum_dot if self.sum_dot else float("nan")}


class LatentStats:
    """Firing counts per latent over a window of examples."""

    def __init__(self, n_latents: int):
        self.count = torch.zeros(n_latents, dtype=torch.float64)
        self.l0_sum = 0.0
        self.n = 0

    @torch.no_grad()
    def update(self, fired: torch.Tensor, l0_mean: float, n_examples: int) -> None:
        self.count += fired.double().cpu()
        self.l0_sum += float(l0_mean) * n_examples
        self.n += n_examples

    def update_dense(self, f: torch.Tensor) -> None:
        active = f != 0
        self.update(active.sum(0), float(active.sum(1).float().mean()), f.shape[0])

    def density(self) -> torch.Tensor:
        return self.count / max(self.n, 1)

    def summary(self) -> dict:
        dens = self.density()
        return {"l0": self.l0_sum / max(self.n, 1), "frac_alive": float((dens > 0).double().mean()),
                "frac_dead": float((dens == 0).double().mean()),
                "frac_dense": float((dens > 0.1).double().mean()),          # firing on > 10% of tokens
                "frac_above_1pct": float((dens > 0.01).double().mean())}


# single-batch forms (the brute-force definitions the tests pin the streaming versions against)
def l0(f: torch.Tensor) -> float:
    return float((f != 0).sum(1).double().mean())


def density(f: torch.Tensor) -> torch.Tensor:
    return (f != 0).double().mean(0)
