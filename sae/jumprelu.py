"""JumpReLU SAE: f_i = z_i * H(z_i - theta_i) with a learned per-latent threshold theta. The step function has
no useful gradient, so theta learns through a straight-through estimator with a rectangle kernel of width
cfg.jumprelu_bandwidth. Penalty: cfg.l0_coef * (L0 / k - 1)^2 (the target-L0 form used by some peers rather than
the paper's lambda * L0, so one coefficient works for every width). theta is initialised from a sample so the
starting L0 is already k (the paper starts at 0.001 and needs far more steps to get there)."""
from __future__ import annotations

import math

import torch
from torch import nn

from sae.base import SAE, Output, fvu


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, bw):
        ctx.save_for_backward(z, theta)
        ctx.bw = bw
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        gz = g * (z > theta)
        gtheta = -(theta / ctx.bw) * _rect((z - theta) / ctx.bw) * g
        return gz, gtheta.sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, bw):
        ctx.save_for_backward(z, theta)
        ctx.bw = bw
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        gtheta = -(1.0 / ctx.bw) * _rect((z - theta) / ctx.bw) * g
        return None, gtheta.sum(0), None


class JumpReLUSAE(SAE):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.n_latents,), math.log(0.1)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    @torch.no_grad()
    def init_threshold(self, x):
        pre = self.dense_preacts(self.centered(x))
        q = 1.0 - self.cfg.k / self.cfg.n_latents
        theta = torch.quantile(pre.flatten()[:1_000_000].float(), q).clamp_min(1e-3)
        self.log_threshold.fill_(math.log(float(theta)))

    @torch.no_grad()
    def scale_threshold(self, alpha):
        self.log_threshold.add_(math.log(alpha))

    def encode_n(self, x: torch.Tensor) -> torch.Tensor:
        z = self.dense_preacts(self.centered(x))
        return z * (z > self.threshold)

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_fn=fvu, sparsity_scale: float = 1.0) -> Output:
        z = self.dense_preacts(self.centered(x))
        theta, bw = self.threshold, self.cfg.jumprelu_bandwidth
        f = _JumpReLU.apply(z, theta, bw)
        recon = f @ self.W_dec + self.b_dec + self.skip_out(x)
        rec = loss_fn(y, recon)
        l0 = _Step.apply(z, theta, bw).sum(1).mean()
        penalty = (l0 / self.cfg.k - 1.0) ** 2 if self.cfg.k else l0
        loss = rec + self.cfg.l0_coef * penalty
        active = f.detach() > 0
        return Output(loss=loss, parts={"recon": rec.detach(), "l0_penalty": penalty.detach()},
                      recon=recon.detach(), l0=l0.detach(), fired=active.sum(0))
