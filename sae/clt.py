"""Cross-layer transcoder (CLT; Ameisen et al. 2025 "Circuit Tracing"): one encoder per layer reading mlp_in.L,
each latent of layer L writing, through its own decoder per target, into mlp_out of L and of every later layer.
mlp_out.M is reconstructed as b_dec[M] + sum over source layers s <= M of f_s @ W_dec[s -> M].

Storage (memory explicit: decoders grow with the (source, target) pairs, n_layers (n_layers + 1) / 2 of them):
    W_enc_layers.<s>  [n, d]         encoder of source position s, latent-major (the sparse backward writes rows)
    b_enc             [L, n]
    W_dec_from.<s>    [n, L - s, d]  decoders of source s to targets s..L-1 (latent i's are contiguous)
    b_dec             [L, d]
One parameter per layer rather than one stacked tensor: the gradient of a slice of a parameter is materialised
at the whole parameter's size, which made a stacked CLT step ~1.5x slower. W_enc ([L, n, d]) and W_dec
([L n, L d], one row per latent over all output blocks) are read-only copies for inspection and analysis.
plus log_threshold [L, n] (jumprelu) or threshold [L] (batchtopk inference). Layer indices inside the tensors
are positions 0..L-1 in cfg.in_keys; the raw-unit API below takes model layer numbers (cfg.layers).

The trainer's view is the one every mode has (sae/modes.py): x = the L normalised mlp_in blocks concatenated
[B, L d], y = the L normalised mlp_out blocks [B, L d], n_latents = L n (the firing statistics are per layer
blocks), k = active latents per example *per layer*; loss = sum over output layers of each layer's FVU
(the caller's loss_fn). Sparsity: TopK / BatchTopK per source layer (sparse decode, AuxK per layer on the dead
latents of that layer), or JumpReLU with either the project's target-L0 penalty per layer (sae/jumprelu.py) or,
cfg.sparsity == "tanh", the paper's penalty on decoder-norm-weighted activations:
    tanh_coef * sum over layers s and latents i of tanh(tanh_c * a_si * ||W_dec_from[s][i]||)   (mean over tokens)
where ||W_dec_from[s][i]|| is the norm of latent i's decoders to every layer it writes, concatenated. It reaches
the thresholds through the same straight-through estimator as the reconstruction (the JumpReLU's), and it cannot
be lowered by shrinking decoders and growing activations. As in Anthropic's recipe (Circuits Updates, January
2025) its weight ramps linearly from 0 over the run (SAEStepper's sparsity_scale; --tanh-warmup-steps), and a
pre-activation loss keeps latents from dying:
    pre_act_coef / d * sum over s, i of ReLU(theta_si - h_si) * ||W_dec_from[s][i]||   (mean over tokens)
with h the pre-activations: it pushes up (only) the pre-activations below their thresholds; divided by d because
the reconstruction loss is an FVU (per unit of normalised squared error, as ReLU's l1_coef).

Raw-unit API (for attribution graphs; unnormalised activation units in and out, latent values as the trainer
sees them):
    encode_layer(layer, x_TD) -> acts [T, n]
    decode_to(layer, {src_layer: acts [T, n]}) -> mlp_out reconstruction [T, d] (bias included once)
    decoder_vectors(src_layer, tgt_layer, idx) -> [len(idx), d]  (what latent idx adds per unit of activation)
TranscoderSet gives a bank of per-layer transcoders the same API (tgt == src only).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from activations.errors import StrataError
from sae import kernels
from sae.base import SAE, Output, fvu, geometric_median
from sae.config import SAEConfig
from sae.jumprelu import _JumpReLU, _Step

CLT_ARCHS = ("topk", "batchtopk", "jumprelu")


def n_pairs(n_layers: int) -> int:
    return n_layers * (n_layers + 1) // 2


def size_plan(n_layers: int, d: int, n: int, arch: str = "topk") -> dict:
    """Parameter count and training memory (fp32 weights + gradients + two Adam moments) of a CLT."""
    params = n_layers * n * d + n_layers * n + n_pairs(n_layers) * n * d + n_layers * d
    if arch == "jumprelu":
        params += n_layers * n
    return {"params": params, "encoder_params": n_layers * n * d, "decoder_params": n_pairs(n_layers) * n * d,
            "train_bytes": 4 * 4 * params}


def available_bytes(device) -> int:
    """Memory the CLT may take: free GPU memory on CUDA, physical RAM otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_fits(n_layers: int, d: int, n: int, arch: str, device) -> str:
    """One line to print at the start; StrataError when training would not fit in memory."""
    p = size_plan(n_layers, d, n, arch)
    gib = p["train_bytes"] / 2**30
    line = (f"clt: {n_layers} layers x {n} latents, {p['params']:,} parameters (encoders {p['encoder_params']:,}, "
            f"decoders {p['decoder_params']:,} over {n_pairs(n_layers)} layer pairs), {gib:.3f} GiB for weights, "
            f"gradients and Adam")
    have = available_bytes(device)
    if p["train_bytes"] > 0.8 * have:
        raise StrataError(f"a CLT of {n_layers} layers x {n} latents needs {gib:.1f} GiB for weights, gradients and "
                          f"Adam but {torch.device(device).type} has {have / 2**30:.1f} GiB; lower --expansion or "
                          f"--n-latents, or train fewer --layers")
    return line


class CrossLayerTranscoder(SAE):
    disk_transposed = {}  # its per-layer encoders are stored as trained, latent-major

    def __init__(self, cfg: SAEConfig):
        nn.Module.__init__(self)  # not SAE.__init__: its single [d_in, n] encoder would be L^2 times too big
        self.cfg = cfg
        L = self.n_layers = len(cfg.in_keys)
        if L == 0 or cfg.n_latents % L or cfg.d_in % L or cfg.d_in != cfg.d_out or len(cfg.out_keys) != L:
            raise StrataError(f"CLT config does not split into {L} layers (d_in {cfg.d_in}, d_out {cfg.d_out}, "
                              f"n_latents {cfg.n_latents}, {len(cfg.out_keys)} out keys); retrain it")
        if cfg.arch not in CLT_ARCHS:
            raise StrataError(f"clt mode supports --arch {', '.join(CLT_ARCHS)}, not {cfg.arch}; pick one of those")
        n = self.n = cfg.n_latents // L
        d = self.d = cfg.d_in // L
        self.W_enc_layers = nn.ParameterList([nn.Parameter(torch.empty(n, d)) for _ in range(L)])
        self.b_enc = nn.Parameter(torch.zeros(L, n))
        self.W_dec_from = nn.ParameterList([nn.Parameter(torch.zeros(n, L - s, d)) for s in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.W_skip = None
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((L, n), math.log(0.1)))
        if cfg.arch == "batchtopk":
            self.register_buffer("threshold", torch.zeros(L))
            self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("stale_tokens", torch.zeros(L * n, dtype=torch.int64))
        self.register_buffer("fire_count", torch.zeros(L * n, dtype=torch.float64))
        self.register_buffer("tokens_counted", torch.zeros((), dtype=torch.float64))
        self._compute_dtype = torch.float32  # set_compute_dtype
        self.reset_parameters()

    # ------------------------------------------------------------------ layout
    def dec_block(self, s: int) -> torch.Tensor:
        """Decoders of source position s: [n, (L - s) * d] (a view; column block t - s writes target t)."""
        return self.W_dec_from[s].view(self.n, (self.n_layers - s) * self.d)

    @property
    def W_enc(self) -> torch.Tensor:
        return torch.stack(list(self.W_enc_layers)).detach()

    @property
    def W_dec(self) -> torch.Tensor:
        """Every latent's decoder over the concatenated mlp_out blocks, [L n, L d] (zero for targets before its
        layer): one row per latent as other SAEs have, so decode_n(f) = f @ W_dec + b_dec. A copy, built on use."""
        L, n, d = self.n_layers, self.n, self.d
        full = torch.zeros(L * n, L * d, dtype=self.b_dec.dtype, device=self.b_dec.device)
        for s in range(L):
            full[s * n:(s + 1) * n, s * d:] = self.dec_block(s).detach()
        return full

    @property
    def _param(self) -> torch.Tensor:
        return self.b_dec  # for device and dtype

    def _pos(self, layer: int) -> int:
        layers = self.cfg.layers
        if layer not in layers:
            raise StrataError(f"layer {layer} is not one of this CLT's layers {layers}; pass one of them")
        return layers.index(layer)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        enc = torch.randn(self.n_layers, self.n, self.d, generator=generator)
        for s, w in enumerate(self.W_enc_layers):
            w.copy_(enc[s] / enc[s].norm(dim=1, keepdim=True))
        self.b_enc.zero_()
        for w in self.W_dec_from:  # as the per-layer transcoder: input and output spaces differ, decoders learned freely
            w.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor, y: torch.Tensor, b_dec_init: str = "median") -> None:
        ys = y.view(y.shape[0], self.n_layers, self.d)
        for t in range(self.n_layers):
            self.b_dec[t] = geometric_median(ys[:, t]) if b_dec_init == "median" else ys[:, t].mean(0)
        if self.cfg.arch == "jumprelu":  # starting L0 = k per layer
            pre = self.preacts(x)
            q = 1.0 - self.cfg.k / self.n
            for s in range(self.n_layers):
                theta = torch.quantile(pre[s].flatten()[:1_000_000].float(), q).clamp_min(1e-3)
                self.log_threshold[s] = math.log(float(theta))

    # ------------------------------------------------------------------ normalised-unit core
    def layers_of(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L d] -> [L, B, d] (a view)."""
        return x.view(x.shape[0], self.n_layers, self.d).transpose(0, 1)

    def preacts(self, x: torch.Tensor) -> torch.Tensor:
        """Every layer's encoder on its block: [L, B, n], in self.compute_dtype's matmul."""
        dt = self.compute_dtype
        xs = self.layers_of(x)
        if torch.is_grad_enabled():  # F.linear: the weight gradient comes out latent-major, as the parameter
            pre = torch.stack([F.linear(xs[s].to(dt), w.to(dt)) for s, w in enumerate(self.W_enc_layers)])
            return pre.float() + self.b_enc[:, None, :]
        pre = torch.empty(self.n_layers, x.shape[0], self.n, dtype=dt, device=x.device)
        for s, w in enumerate(self.W_enc_layers):
            torch.matmul(xs[s].to(dt), w.t().to(dt), out=pre[s])
        return pre.float().add_(self.b_enc[:, None, :])

    def activate(self, s: int, pre: torch.Tensor) -> torch.Tensor:
        """Dense activations of source position s from its pre-activations [B, n] (inference rule)."""
        if self.cfg.arch == "jumprelu":
            return pre * (pre > self.log_threshold[s].exp())
        if self.cfg.arch == "batchtopk" and not self.training:
            return pre * (pre > self.threshold[s].clamp_min(0))
        vals, cols = pre.topk(self.cfg.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, cols, vals.clamp(min=0))

    def encode_n(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.preacts(x)
        return torch.cat([self.activate(s, pre[s]) for s in range(self.n_layers)], 1)

    def decode_n(self, f: torch.Tensor) -> torch.Tensor:
        L, n, d = self.n_layers, self.n, self.d
        recon = self.b_dec.reshape(1, L * d).repeat(f.shape[0], 1)
        for s in range(L):
            recon[:, s * d:] += f[:, s * n:(s + 1) * n] @ self.dec_block(s)
        return recon

    def _select(self, s: int, pre: torch.Tensor):
        """Training selection of source position s: (rows, cols, vals) sorted by row, vals relu'd."""
        B, k = pre.shape[0], self.cfg.k
        if self.cfg.arch == "batchtopk":
            return kernels.batch_select(pre, k * B)
        vals, cols = kernels.topk_rows(pre, k)
        return torch.arange(B, device=pre.device).repeat_interleave(k), cols.reshape(-1), vals.reshape(-1).clamp_(min=0)

    @torch.no_grad()
    def _update_threshold(self, s: int, vals: torch.Tensor) -> None:
        pos = vals[vals > 0]
        if pos.numel():
            beta = min(0.999, 1.0 - 1.0 / float(self.threshold_updates + 1))
            self.threshold[s] = beta * self.threshold[s] + (1 - beta) * pos.min()

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_fn=fvu, sparsity_scale: float = 1.0) -> Output:
        if self.cfg.arch == "jumprelu":
            return self._forward_jumprelu(x, y, loss_fn, sparsity_scale)
        B, L, n, d = x.shape[0], self.n_layers, self.n, self.d
        xs = self.layers_of(x).contiguous()  # [L, B, d]: each layer's rows contiguous for the sparse backward
        with torch.no_grad():
            pre = self.preacts(x)
        recon = self.b_dec.reshape(1, L * d).repeat(B, 1)
        fired, active_total, aux_jobs = [], 0, []
        for s in range(L):
            rows, cols, vals = self._select(s, pre[s])
            aux = kernels.aux_select(pre[s], self.dead_mask()[s * self.n:(s + 1) * self.n], self.cfg.k_aux) \
                if self.training else None
            if self.training and self.cfg.arch == "batchtopk":
                self._update_threshold(s, vals)
            a_rows, a_cols, a_vals = rows, cols, vals
            if aux is not None:
                a_rows, a_cols, a_vals = (torch.cat([p, q]) for p, q in zip((rows, cols, vals), aux))
            g = kernels.gather_preacts(xs[s], None, self.W_enc_layers[s].t(), self.b_enc[s], a_rows, a_cols, a_vals)
            nnz = cols.numel()
            recon[:, s * d:] += kernels.sparse_decode(g[:nnz], cols, kernels.row_offsets(rows, B), self.dec_block(s))
            if aux is not None:
                aux_jobs.append((s, g[nnz:], aux))
            active = vals > 0
            fired.append(torch.bincount(cols[active], minlength=n))
            active_total = active_total + active.sum()
        if self.training and self.cfg.arch == "batchtopk":
            self.threshold_updates += 1
        del pre
        loss = loss_fn(y, recon)
        parts = {"recon": loss.detach()}
        if aux_jobs:
            residual = (y - recon).detach()
            auxk = torch.stack([torch.nan_to_num(loss_fn.one(residual[:, s * d:], kernels.sparse_decode(
                g_aux, aux[1], kernels.row_offsets(aux[0], B), self.dec_block(s))), nan=0.0) for s, g_aux, aux in aux_jobs]).mean()
            parts["auxk"] = auxk.detach()
            loss = loss + self.cfg.aux_coef * auxk
        return Output(loss=loss, parts=parts, recon=recon.detach(), l0=active_total / B, fired=torch.cat(fired))

    def _forward_jumprelu(self, x: torch.Tensor, y: torch.Tensor, loss_fn, sparsity_scale: float) -> Output:
        B, L, n, d = x.shape[0], self.n_layers, self.n, self.d
        z = self.preacts(x).transpose(0, 1)  # [B, L, n]
        theta, bw = self.log_threshold.exp(), self.cfg.jumprelu_bandwidth
        f = _JumpReLU.apply(z, theta, bw)
        recon = self.b_dec.reshape(1, L * d).repeat(B, 1)
        for s in range(L):
            recon[:, s * d:] += f[:, s] @ self.dec_block(s)
        rec = loss_fn(y, recon)
        parts = {"recon": rec.detach()}
        if self.cfg.sparsity == "tanh":
            dec_norm_Ln = torch.stack([w.norm(dim=(1, 2)) for w in self.W_dec_from])
            penalty = torch.tanh(self.cfg.tanh_c * f * dec_norm_Ln).sum((1, 2)).mean()
            loss = rec + sparsity_scale * self.cfg.tanh_coef * penalty
            parts["tanh_penalty"] = penalty.detach()
            if self.cfg.pre_act_coef > 0:
                pre_act = (torch.relu(theta - z) * dec_norm_Ln).sum((1, 2)).mean()
                loss = loss + self.cfg.pre_act_coef / d * pre_act
                parts["pre_act_loss"] = pre_act.detach()
            l0_L = (z.detach() > theta.detach()).sum(2).float().mean(0)
        else:
            l0_L = _Step.apply(z, theta, bw).sum(2).mean(0)  # per layer
            penalty = ((l0_L / self.cfg.k - 1.0) ** 2).mean()
            loss = rec + self.cfg.l0_coef * penalty
            parts["l0_penalty"] = penalty.detach()
        active = f.detach() > 0
        return Output(loss=loss, parts=parts,
                      recon=recon.detach(), l0=l0_L.sum().detach(), fired=active.sum(0).reshape(L * n))

    # ------------------------------------------------------------------ raw units
    def _scale(self, keys: list, scales: list, key, d: int):
        if key is not None:
            return super()._scale(keys, scales, key, d)
        return torch.tensor(scales, dtype=torch.float32, device=self._param.device).repeat_interleave(self.d)

    def encode(self, x: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """Raw mlp_in blocks [B, L d] -> latents [B, L n] (layer blocks in order)."""
        if key is not None:
            raise StrataError("a CLT encodes all its layers at once; use encode_layer(layer, x) for one layer")
        return self.encode_n(x.to(self._param.dtype) * self.in_scale())

    def decode(self, f: torch.Tensor, key: str | None = None) -> torch.Tensor:
        return self.decode_n(f) / self.out_scale()

    def reconstruct(self, x: torch.Tensor, key: str | None = None) -> torch.Tensor:
        return self.decode(self.encode(x))

    def encode_layer(self, layer: int, x_TD: torch.Tensor) -> torch.Tensor:
        """Raw mlp_in.<layer> [T, d] -> that layer's latents [T, n]."""
        s = self._pos(layer)
        xs = x_TD.to(self._param.dtype) * float(self.cfg.in_scales[s])
        dt = self.compute_dtype
        pre = (xs.to(dt) @ self.W_enc_layers[s].t().to(dt)).float() + self.b_enc[s]
        return self.activate(s, pre)

    def decode_to(self, layer: int, acts_by_src: dict) -> torch.Tensor:
        """mlp_out.<layer> [T, d] in raw units from {source layer <= layer: latents [T, n]} (others ignored)."""
        t = self._pos(layer)
        out = None
        for src, acts in acts_by_src.items():
            s = self._pos(src)
            if s > t:
                continue
            part = acts.to(self._param.dtype) @ self.dec_block(s)[:, (t - s) * self.d:(t - s + 1) * self.d]
            out = part if out is None else out + part
        out = self.b_dec[t] if out is None else out + self.b_dec[t]
        return out / float(self.cfg.out_scales[t])

    def decoder_vectors(self, src: int, tgt: int, idx) -> torch.Tensor:
        """Decoder rows of latents `idx` of layer src into mlp_out.<tgt>, raw units: [len(idx), d]."""
        s, t = self._pos(src), self._pos(tgt)
        if t < s:
            raise StrataError(f"a latent of layer {src} writes only to layers >= {src}, not {tgt}")
        idx = torch.as_tensor(idx, dtype=torch.long, device=self._param.device)
        return self.dec_block(s)[idx, (t - s) * self.d:(t - s + 1) * self.d] / float(self.cfg.out_scales[t])
