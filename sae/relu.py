"""ReLU SAE with an L1 penalty (Anthropic's "April update" recipe): loss = recon + lambda * mean_b sum_i f_i ||d_i||,
decoder rows left unconstrained (the norm-weighted L1 stops the decoder from growing to shrink f), lambda
warmed up linearly (SAEStepper's sparsity_scale). Reconstruction is measured as FVU, so lambda is applied per unit of
normalised squared error: cfg.l1_coef / d_out (l1_coef = 5 matches the paper's lambda = 5 on E||x||^2 = d)."""
from __future__ import annotations

import torch

from sae.base import SAE, Output, fvu


class ReLUSAE(SAE):
    def encode_n(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense_preacts(self.centered(x)))

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_fn=fvu, sparsity_scale: float = 1.0) -> Output:
        f = torch.relu(self.dense_preacts(self.centered(x)))
        recon = f @ self.W_dec + self.b_dec + self.skip_out(x)
        rec = loss_fn(y, recon)
        l1 = (f * self.W_dec.norm(dim=1)).sum(1).mean()
        loss = rec + sparsity_scale * self.cfg.l1_coef / self.cfg.d_out * l1
        active = f > 0
        return Output(loss=loss, parts={"recon": rec.detach(), "l1": l1.detach()}, recon=recon.detach(),
                      l0=active.sum(1).float().mean().detach(), fired=active.sum(0))
