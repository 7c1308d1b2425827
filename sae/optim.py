"""One SAE's optimisation step: Adam, learning-rate warm-up and decay, gradient clipping, decoder unit-norm.

Default learning rate scales with width as in Gao et al.: 2e-4 * sqrt(2^14 / n_latents). Schedule: linear
warm-up over `warmup_steps`, constant, then linear decay to zero over the last `decay_fraction` of the steps.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from activations.errors import StrataError
from sae.base import FVU, SAE, Output, fvu


def default_lr(n_latents: int) -> float:
    return 2e-4 * math.sqrt(2**14 / n_latents)


def latents_per_dictionary(cfg) -> int:
    """The width the learning-rate rule scales with: a CLT holds one dictionary per layer (n_latents counts all
    layers' latents), every other SAE one."""
    return cfg.n_latents // len(cfg.in_keys) if cfg.mode == "clt" else cfg.n_latents


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(total_steps * decay_fraction)
    start = total_steps - decay_steps
    if decay_steps > 0 and step >= start:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0


class NonFiniteLoss(StrataError):
    pass


class SAEStepper:
    def __init__(self, sae: SAE, lr: float, total_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.2,
                 grad_clip: float = 1.0, betas=(0.9, 0.999), eps: float = 6.25e-10, sync=None,
                 sparsity_warmup_steps: int = 0):
        """sparsity_warmup_steps: the sparsity penalty's weight ramps linearly to its full value over these steps
        (ReLU's L1 warm-up, the CLT tanh penalty's ramp; the SAE's forward takes it as sparsity_scale); 0: none.
        sync: in data-parallel training (sae/distributed.py) the process group's in-place all-reduces mean_(t) and
        sum_(t), its `size` and `global_variance(y)`; the step is otherwise the single-process one. None: one process."""
        self.sae, self.sync = sae, sync
        self.base_lr = lr
        self.total_steps, self.warmup_steps, self.decay_fraction = total_steps, warmup_steps, decay_fraction
        self.grad_clip = grad_clip
        self.sparsity_warmup_steps = sparsity_warmup_steps
        params = [p for p in sae.parameters() if p.requires_grad]
        try:  # the fused CPU/GPU kernel is ~4x faster than foreach on CPU
            self.opt = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int, loss_fn: FVU = fvu) -> Output:
        sae, sync = self.sae, self.sync
        if sync is not None:  # every FVU (reconstruction, AuxK) over the global batch's variance
            loss_fn = replace(loss_fn, variance=sync.global_variance)
        warm = self.sparsity_warmup_steps
        out = sae(x, y, loss_fn, sparsity_scale=min(1.0, (step + 1) / warm) if warm > 0 else 1.0)
        loss = out.loss.detach() if sync is None else sync.mean_(out.loss.detach().clone())
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLoss(f"loss became {float(loss)} at step {step}")
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if sync is not None:
            for p in self.opt.param_groups[0]["params"]:
                if p.grad is not None:  # None on every process alike (it depends on the architecture, not the data)
                    sync.mean_(p.grad)
        sae.remove_parallel_grad()
        if self.grad_clip > 0:  # rescaled only when over the limit: most steps skip that pass over every gradient
            params = self.opt.param_groups[0]["params"]
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
            if float(norm) > self.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm, foreach=True)
        lr = self.base_lr * lr_factor(step, self.total_steps, self.warmup_steps, self.decay_fraction)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        sae.normalize_decoder()
        if sync is None:
            sae.track_firing(out.fired, x.shape[0])
        else:  # every process counts firings over the global batch, and logs the global loss
            sae.track_firing(sync.sum_(out.fired.clone()), x.shape[0] * sync.size)
            out.loss = loss
            out.parts = {k: sync.mean_(v.clone()) for k, v in out.parts.items()}
        return out
