"""The interface every SAE architecture shares, and what they have in common.

Two unit systems: the trainer works in *normalised* units (inputs multiplied by one scalar per key so that
E||x||^2 = d) through `forward`; users work in *raw* activation units through `encode` / `decode` /
`reconstruct`, which apply the stored scalars. Choice: the scalars are kept separate (cfg.in_scales /
out_scales) rather than folded into the weights, so the trained weights stay comparable across layers;
the SAELens export folds them into the weights.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from activations.errors import StrataError
from sae.config import SAEConfig

COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


def local_variance(y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of squared deviations of y's rows about their mean, 1): the FVU denominator of a batch one process holds
    whole. (Deviations and one dot product: ~5x cheaper on CPU than mse_loss against the broadcast mean.)"""
    dev = (y - y.mean(0)).reshape(-1)
    return torch.dot(dev, dev), 1


@dataclass(frozen=True)
class FVU:
    """The reconstruction loss of every architecture: fraction of variance unexplained about the batch mean,
    sum ||y - recon||^2 / sum ||y - mean(y)||^2 (mse_loss has a one-pass fused backward; the denominator is a
    constant of the batch).

    blocks > 1 splits y and recon into equal blocks along `dim` and combines the blocks' FVUs with `reduce`: the
    multi-layer SAE stacks layers along the batch (dim 0, mean: every layer counts equally), crosscoders and CLTs
    concatenate them along the features (dim 1, sum over output layers).
    variance: y -> (denominator, number of processes). In data-parallel training (sae/distributed.py) it is the
    global batch's variance and the process count, the error is scaled by that count, and the mean over processes
    (value and gradient) is then the single-process FVU."""

    blocks: int = 1
    dim: int = 0
    reduce: str = "mean"
    variance: Callable[[torch.Tensor], tuple[torch.Tensor, int]] = local_variance

    def __call__(self, y: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        if self.blocks == 1:
            return self.one(y, recon)
        losses = torch.stack([self.one(a, b) for a, b in zip(y.chunk(self.blocks, self.dim),
                                                               recon.chunk(self.blocks, self.dim))])
        return losses.mean() if self.reduce == "mean" else losses.sum()

    def one(self, y: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """The FVU of one block (AuxK's loss too), with this loss's variance."""
        err = F.mse_loss(recon, y, reduction="sum")
        with torch.no_grad():
            var, n = self.variance(y)
        return n * err / var.clamp_min(1e-12)


fvu = FVU()  # one block, the local batch's variance


@dataclass
class Output:
    loss: torch.Tensor           # scalar to backpropagate
    parts: dict                  # detached scalar tensors: recon, auxk, l1, l0_penalty, ...
    recon: torch.Tensor          # detached reconstruction [B, d_out], normalised units
    l0: torch.Tensor             # mean active latents per example (detached scalar)
    fired: torch.Tensor          # [n_latents] number of examples each latent fired on in this batch


class SAE(nn.Module):
    """Parameters: W_enc_ND [n, d_in] (the encoder, latent-major and contiguous: the sparse backward writes whole
    rows, and the fused Adam kernel walks a contiguous tensor without copying it), b_enc [n], W_dec [n, d_out],
    b_dec [d_out], optional W_skip. `W_enc` is its [d_in, n] transposed view, the layout readers use
    (pre = x @ W_enc + b_enc) and the weights file stores (see _save_to_state_dict)."""

    # parameters the state dict (sae.safetensors, and optimizer.safetensors' moments) holds transposed, under
    # another name: the file layout from before the encoder was stored latent-major, which old checkpoints have
    disk_transposed = {"W_enc_ND": "W_enc"}

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        n, d_in, d_out = cfg.n_latents, cfg.d_in, cfg.d_out
        self.W_enc_ND = nn.Parameter(torch.empty(n, d_in))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out)) if cfg.skip else None
        # training statistics (saved with the SAE: the export's sparsity and the dead-latent count come from them)
        self.register_buffer("stale_tokens", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("fire_count", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("tokens_counted", torch.zeros((), dtype=torch.float64))
        self._compute_dtype = torch.float32  # set_compute_dtype
        self.reset_parameters()

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder as [d_in, n] (a view of W_enc_ND: writes through it change the parameter)."""
        return self.W_enc_ND.t()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, disk in self.disk_transposed.items():
            destination[prefix + disk] = destination.pop(prefix + name).t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, disk in self.disk_transposed.items():  # state_dict is load_state_dict's own copy
            if prefix + disk in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + disk).t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the dense encoder matmul (weights, gradients and optimiser state stay fp32)."""
        return self._compute_dtype

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Run the dense encoder matmul in `dtype`: torch.float32, or torch.bfloat16 where it is fast
        (activations/precision.py decides; sae.models.use_precision and the trainer call this)."""
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype {dtype} is not one of {COMPUTE_DTYPES}")
        self._compute_dtype = dtype

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        cfg = self.cfg
        dec = torch.randn(cfg.n_latents, cfg.d_out, generator=generator)
        dec /= dec.norm(dim=1, keepdim=True)
        if cfg.mode == "transcoder":
            # input and output spaces differ: random unit encoder rows, decoder starts at zero (learned freely)
            enc = torch.randn(cfg.n_latents, cfg.d_in, generator=generator)
            self.W_enc_ND.copy_(enc / enc.norm(dim=1, keepdim=True))
            self.W_dec.zero_()
        else:
            self.W_dec.copy_(dec)
            self.W_enc_ND.copy_(dec)  # encoder = decoder transpose
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor, y: torch.Tensor, b_dec_init: str = "median") -> None:
        """Data-dependent init from a sample in normalised units: b_dec = geometric median (or mean) of targets."""
        if b_dec_init == "median":
            self.b_dec.copy_(geometric_median(y))
        elif b_dec_init == "mean":
            self.b_dec.copy_(y.mean(0))
        if self.cfg.mode == "transcoder":
            return
        # Encoder = decoder^T over-shoots when k is not << d (k latents each add their full projection):
        # rescale the encoder by the least-squares factor that makes the first reconstructions the right size.
        self.init_threshold(x)
        recon = self.decode_n(self.encode_n(x)) - self.b_dec
        target = y - self.b_dec
        alpha = float((recon * target).sum() / recon.pow(2).sum().clamp_min(1e-12))
        if 0 < alpha < float("inf"):
            self.W_enc_ND.mul_(alpha)
            self.scale_threshold(alpha)

    def init_threshold(self, x: torch.Tensor) -> None:
        """Architectures with a learned threshold set it from the sample (JumpReLU)."""

    def scale_threshold(self, alpha: float) -> None:
        pass

    # ------------------------------------------------------------------ normalised-unit core
    def centered(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def dense_preacts(self, x_c: torch.Tensor) -> torch.Tensor:
        """x_c @ W_enc + b_enc with autograd (the dense architectures' encoder), in self.compute_dtype. F.linear on
        the latent-major W_enc_ND: its backward writes the weight gradient [n, d_in] in the parameter's layout."""
        if self.compute_dtype == torch.float32:
            return F.linear(x_c, self.W_enc_ND, self.b_enc)
        dt = self.compute_dtype
        return F.linear(x_c.to(dt), self.W_enc_ND.to(dt), self.b_enc.to(dt)).float()

    @torch.no_grad()
    def raw_preacts(self, x_c: torch.Tensor) -> torch.Tensor:
        """x_c @ W_enc + b_enc without autograd, bias added in place: addmm would first copy the broadcast bias
        into the B x n output (a full extra pass over the largest tensor of the step). No relu pass either: the
        TopK family selects first and clamps only the selected values (same latents, same values)."""
        dt = self.compute_dtype
        pre = x_c.to(dt) @ self.W_enc.to(dt)
        if dt != torch.float32:
            pre = pre.float()
        return pre.add_(self.b_enc)

    @torch.no_grad()
    def selection_blocks(self, x_c: torch.Tensor, block_rows: int):
        """Yield (start, pre) for consecutive blocks of at most `block_rows` rows: pre = (x_c @ W_enc + b_enc) of rows
        start.., in self.compute_dtype, for *choosing* the active latents in training. Every block is written into one
        buffer, reused (the caller is done with a block before asking for the next): a block stays in cache while
        top-k reads it, and the step never allocates (page-faults in) the whole B x n tensor, which cost a fifth of a
        bf16 step on CPU. In bf16 the bias rides in the matmul (addmm into the buffer) and nothing is converted back
        to fp32; the chosen latents' values are then recomputed exactly in fp32 (kernels.sampled_preacts)."""
        dt = self.compute_dtype
        x, W, b = x_c.to(dt), self.W_enc.to(dt), self.b_enc.to(dt)
        B = x.shape[0]
        buf = torch.empty(min(block_rows, B), W.shape[1], dtype=dt, device=x.device)
        for start in range(0, B, block_rows):
            rows = x[start:start + block_rows]
            pre = buf[:rows.shape[0]]
            if dt == torch.float32:  # as raw_preacts: mm, then the bias in place
                torch.mm(rows, W, out=pre).add_(b)
            else:
                torch.addmm(b, rows, W, out=pre)
            yield start, pre

    def skip_out(self, x: torch.Tensor):
        return x @ self.W_skip if self.W_skip is not None else 0.0

    def encode_n(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_n(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_fn=fvu, sparsity_scale: float = 1.0) -> Output:
        raise NotImplementedError

    # ------------------------------------------------------------------ raw-unit API (loader contract)
    def _scale(self, keys: list, scales: list, key, d: int) -> torch.Tensor | float:
        if key is not None:
            if key not in keys:
                raise StrataError(f"key {key!r} is not one of this SAE's keys {keys}; pass one of them")
            return float(scales[keys.index(key)])
        if len(keys) == 1:
            return float(scales[0])
        if self.cfg.mode == "crosscoder":  # concatenated blocks, one scalar each
            block = d // len(keys)
            return torch.tensor(scales, dtype=torch.float32, device=self.W_dec.device).repeat_interleave(block)
        raise StrataError(f"this {self.cfg.mode} SAE reads {len(keys)} keys with different normalisations; "
                          f"pass key= (one of {keys})")

    def in_scale(self, key=None):
        return self._scale(self.cfg.in_keys, self.cfg.in_scales, key, self.cfg.d_in)

    def out_scale(self, key=None):
        return self._scale(self.cfg.out_keys, self.cfg.out_scales, key, self.cfg.d_out)

    def encode(self, x: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """Raw activations [B, d_in] -> dense non-negative latents [B, n_latents]."""
        return self.encode_n(x.to(self.W_dec.dtype) * self.in_scale(key))

    def decode(self, f: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """Latents -> raw-unit output [B, d_out] (without a transcoder's skip term; see reconstruct)."""
        return self.decode_n(f) / self.out_scale(key)

    def reconstruct(self, x: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """Raw input -> raw reconstruction/prediction, skip connection included."""
        xs = x.to(self.W_dec.dtype) * self.in_scale(key)
        return (self.decode_n(self.encode_n(xs)) + self.skip_out(xs)) / self.out_scale(key)

    # ------------------------------------------------------------------ training hooks
    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop each decoder row's gradient component along the row (the unit-norm constraint's tangent)."""
        if self.cfg.normalize_decoder and self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g.addcmul_(torch.linalg.vecdot(g, w).unsqueeze(1), w, value=-1)  # no [n, d] temporaries

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.cfg.normalize_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def track_firing(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Dead/dense bookkeeping counted in tokens (not steps)."""
        fired = fired.to(self.fire_count.device)
        self.stale_tokens += n_tokens
        self.stale_tokens[fired > 0] = 0
        self.fire_count += fired.double()
        self.tokens_counted += n_tokens

    def dead_mask(self) -> torch.Tensor:
        return self.stale_tokens >= self.cfg.dead_tokens


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        dist = (x - m).norm(dim=1).clamp_min(1e-9)
        w = 1.0 / dist
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * max(1.0, float(m.norm())):
            m = new
            break
        m = new
    return m.float()
