"""Attention-output SAEs attributed to attention heads (direct feature attribution, as in Kissane et al. 2024,
"Interpreting Attention Layer Outputs with Sparse Autoencoders").

attn_out.L, the output of block L's attention, is its output projection applied to z, the heads' outputs laid
side by side: attn_out = sum_h z_h @ W_O[:, h]^T + b_O. An SAE's pre-activation is linear in its input, so for
feature f it splits exactly into one term per head plus a constant:

    pre_f = sum_h s * (z_h @ W_O[:, h]^T) . W_enc[:, f]  +  (s * b_O . W_enc[:, f] - b_dec . W_enc[:, f] + b_enc[f])

(s: the SAE's input scale for that key; the b_dec term only for an SAE that centres its input). On a context
where f fires, its activation is pre_f, so head h's share of it is term_h / pre_f; the shares and the constant's
share ("bias") sum to 1.

The shards hold attn_out only, so z is recomputed: the model runs (early exit after the deepest layer needed) on
the contexts that hold the features' top activations, each cut after the last top position it holds (the model
is causal, so nothing after a position changes it), a few contexts per forward pass; o_proj's input is read by a
forward pre-hook. Per-layer SAEs and multi-layer SAEs over attn_out keys get attributions (a multi-layer SAE per
layer: each top context belongs to the layer it fired at); other SAEs are left out.

Index fields (per attributed SAE; L = its layers, 1 for a per-layer SAE; H = heads):
  top_head_share [n, top_k, H], top_head_bias_share [n, top_k]: each top context's shares (NaN: no context)
  head_share [n, L, H], head_bias_share [n, L]: mean over the feature's top contexts at that layer (NaN: none)
  head_contexts [n, L]: how many top contexts each mean is over
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from activations.errors import StrataError
from activations.hooks import attention_module, capture_at, split_key

_OUT_PROJ_NAMES = ("o_proj", "c_proj", "out_proj", "dense")
FIELDS = ("top_head_share", "top_head_bias_share", "head_share", "head_bias_share", "head_contexts")


def attributable(sae) -> bool:
    """A per-layer or multi-layer SAE whose every input key is an attention output."""
    cfg = sae.cfg
    return cfg.mode in ("layer", "multilayer") and bool(cfg.in_keys) \
        and all(split_key(k)[0] == "attn_out" for k in cfg.in_keys)


def n_heads(model: nn.Module) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("num_attention_heads", "n_head", "num_heads"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise StrataError(f"{type(model).__name__}'s config names no head count; head attribution needs one")


def output_projection(model: nn.Module, layer: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """(module, W_O [d_model, n_heads * d_head], b_O [d_model] or None) of block `layer`'s attention output
    projection (nn.Linear, or transformers' Conv1D of GPT-2, whose weight is stored transposed)."""
    attn = attention_module(model, layer)
    for name in _OUT_PROJ_NAMES:
        mod = getattr(attn, name, None)
        if isinstance(mod, nn.Linear):
            return mod, mod.weight.detach().float(), None if mod.bias is None else mod.bias.detach().float()
        if mod is not None and type(mod).__name__ == "Conv1D":
            return mod, mod.weight.detach().float().t(), mod.bias.detach().float()
    raise StrataError(f"the attention of {type(model).__name__} has no output projection named "
                      f"{', '.join(_OUT_PROJ_NAMES)}; head attribution is not supported for this model")


@torch.no_grad()
def capture_z(model: nn.Module, layers: list[int], input_ids: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> dict[int, torch.Tensor]:
    """{layer: z [batch, tokens, n_heads * d_head]} (float32): the input of each layer's attention output
    projection, from one forward pass (matmuls in `dtype` by autocast, weights untouched) that stops once the
    deepest layer's z is in hand."""
    points = {f"the attention output projection of layer {layer}": (output_projection(model, layer)[0], "pre")
              for layer in sorted(set(layers))}
    with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        got = capture_at(model, points, input_ids)
    return {layer: got[name].float() for layer, name in zip(sorted(set(layers)), points)}


def head_outputs(z: torch.Tensor, W_O: torch.Tensor, heads: int) -> torch.Tensor:
    """z [..., H * d_head] -> each head's term of the attention output [..., H, d_model] (they sum, with b_O, to
    the attention output)."""
    z_HK = z.reshape(*z.shape[:-1], heads, z.shape[-1] // heads)
    W_DHK = W_O.reshape(W_O.shape[0], heads, -1)
    return torch.einsum("...hk,dhk->...hd", z_HK, W_DHK)


def _constant(sae, W_enc: torch.Tensor, key: str, b_O: torch.Tensor | None) -> torch.Tensor:
    """The part of every feature's pre-activation that no head writes [n]: b_enc, minus b_dec through the
    encoder (if the SAE centres its input), plus the output projection's bias through the encoder."""
    const = sae.b_enc.detach().float().clone()
    if sae.cfg.apply_b_dec_to_input:
        const -= sae.b_dec.detach().float() @ W_enc
    if b_O is not None:
        const += float(sae.in_scale(key)) * (b_O.to(W_enc.device) @ W_enc)
    return const


@torch.no_grad()
def attribute_heads(model: nn.Module, saes: dict, results: dict, read_tokens: Callable[[int, int], np.ndarray],
                    context: int, batch_tokens: int, device, dtype: torch.dtype = torch.float32) -> dict:
    """Head shares of every attributable SAE's top contexts. `results[sid]` holds the index pass's top_row and
    top_slot [n, top_k] (global token rows, -1 = empty); `read_tokens(start, stop)` the run's token ids; the
    model's matmuls run in `dtype` (the shares are computed in float32 from its z).
    Returns {sid: {field: CPU tensor}} with the FIELDS of the module docstring."""
    chosen = {sid: sae for sid, sae in saes.items() if attributable(sae)}
    if not chosen:
        return {}
    heads = n_heads(model)
    todo = {}  # sid -> (features, top positions, context ids, positions in context, slots) of every top context
    for sid in chosen:
        rows = torch.as_tensor(results[sid]["top_row"]).long()
        f, k = (rows >= 0).nonzero(as_tuple=True)
        r = rows[f, k]
        slot = torch.as_tensor(results[sid]["top_slot"]).long()[f, k]
        todo[sid] = (f, k, r // context, r % context, slot)
    contexts, inverse = torch.unique(torch.cat([t[2] for t in todo.values()]), return_inverse=True)
    need = torch.zeros(len(contexts), dtype=torch.long).scatter_reduce(
        0, inverse, torch.cat([t[3] for t in todo.values()]) + 1, reduce="amax")
    order = torch.argsort(need, stable=True)  # contexts of similar lengths share a forward pass
    per_batch = max(1, batch_tokens // context)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))  # context -> its place in the forward passes
    n_batches = -(-len(order) // per_batch)
    at = 0
    for sid, (f, k, _, p, slot) in todo.items():  # each SAE's top contexts sorted by forward pass
        place = rank[inverse[at:at + len(f)]]
        at += len(f)
        batch_of = place // per_batch
        srt = torch.argsort(batch_of, stable=True)
        bounds = torch.searchsorted(batch_of[srt], torch.arange(n_batches + 1))
        todo[sid] = (f[srt], k[srt], (place % per_batch)[srt], p[srt], slot[srt], bounds)
    layers_of = {sid: [split_key(k)[1] for k in sae.cfg.in_keys] for sid, sae in chosen.items()}
    layers = sorted({layer for ls in layers_of.values() for layer in ls})
    proj = {layer: output_projection(model, layer)[1:] for layer in layers}

    out = {}
    for sid, sae in chosen.items():
        n, K = results[sid]["top_row"].shape
        W_enc = sae.W_enc.detach().float()
        consts = [_constant(sae, W_enc, key, proj[layer][1]) for key, layer in zip(sae.cfg.in_keys, layers_of[sid])]
        out[sid] = {"W_enc": W_enc, "consts": consts, "top": torch.full((n, K, heads), float("nan")),
                    "bias": torch.full((n, K), float("nan"))}

    for i in range(n_batches):
        batch = order[i * per_batch:(i + 1) * per_batch]
        length = int(need[batch].max())
        ids = np.stack([read_tokens(int(c) * context, int(c) * context + length) for c in contexts[batch]])
        z = capture_z(model, layers, torch.from_numpy(ids.astype(np.int64)).to(device), dtype)
        for layer in layers:  # each head's term of attn_out at every position of the batch [B, T, H, d]
            terms = head_outputs(z.pop(layer), proj[layer][0], heads)
            for sid, sae in chosen.items():
                f, k, b, p, slot, bounds = todo[sid]
                lo, hi = int(bounds[i]), int(bounds[i + 1])
                for s, key in enumerate(sae.cfg.in_keys):
                    if layers_of[sid][s] != layer:
                        continue
                    sel = lo + (slot[lo:hi] == s).nonzero().squeeze(1)
                    _shares(terms, b[sel], p[sel], f[sel], k[sel], out[sid]["W_enc"], out[sid]["consts"][s],
                            float(sae.in_scale(key)), out[sid]["top"], out[sid]["bias"])

    for sid, sae in chosen.items():
        slots = torch.as_tensor(results[sid]["top_slot"]).long()
        top, bias = out[sid]["top"], out[sid]["bias"]
        out[sid] = {"top_head_share": top, "top_head_bias_share": bias,
                    **mean_by_slot(top, bias, slots, len(sae.cfg.in_keys))}
    return out


def _shares(terms_BTHD: torch.Tensor, b: torch.Tensor, p: torch.Tensor, f: torch.Tensor, k: torch.Tensor,
            W_enc: torch.Tensor, const: torch.Tensor, scale: float, top_NKH: torch.Tensor, bias_NK: torch.Tensor,
            chunk: int = 4096) -> None:
    """Top context k of feature f sits at (batch row b, position p): its heads' terms through f's encoder column
    (times the input scale) divided by the pre-activation, and the constant's, written into top/bias [f, k]."""
    dev = terms_BTHD.device
    for c0 in range(0, len(f), chunk):
        sl = slice(c0, c0 + chunk)
        fs = f[sl].to(W_enc.device)
        terms_PHD = terms_BTHD[b[sl].to(dev), p[sl].to(dev)].to(W_enc.device)
        terms_PH = scale * torch.einsum("phd,dp->ph", terms_PHD, W_enc[:, fs])
        pre_P = terms_PH.sum(1) + const[fs]
        top_NKH[f[sl], k[sl]] = (terms_PH / pre_P.unsqueeze(1)).cpu()
        bias_NK[f[sl], k[sl]] = (const[fs] / pre_P).cpu()


def mean_by_slot(top_NKH: torch.Tensor, bias_NK: torch.Tensor, slots_NK: torch.Tensor, n_slots: int) -> dict:
    """Per feature and layer (slot), the mean of its top contexts' shares at that layer (NaN where none)."""
    valid = ~torch.isnan(bias_NK)
    head, bias, count = [], [], []
    for s in range(n_slots):
        m = (valid & (slots_NK == s)).float()
        cnt = m.sum(1)
        denom = torch.where(cnt > 0, cnt, torch.full_like(cnt, float("nan")))
        head.append(torch.nan_to_num(top_NKH).mul(m.unsqueeze(2)).sum(1) / denom.unsqueeze(1))
        bias.append(torch.nan_to_num(bias_NK).mul(m).sum(1) / denom)
        count.append(cnt.int())
    return {"head_share": torch.stack(head, 1), "head_bias_share": torch.stack(bias, 1),
            "head_contexts": torch.stack(count, 1)}

