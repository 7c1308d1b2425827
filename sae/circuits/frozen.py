"""The clean forward pass of a Llama-family model on one prompt, and the local replacement model built on it.

`clean_pass` runs the model's own modules and keeps what the replacement freezes: every RMSNorm denominator
(1 / sqrt(mean(x^2) + eps) per position), every attention pattern [heads, T, T], and each MLP's input and output.
`replacement_forward` reruns the residual stream with those frozen: attention becomes pattern @ V (linear),
each norm a fixed per-position scale (linear), and each MLP a constant (its clean output) plus, for a transcoder
with a skip connection, the skip term (linear in the MLP input). Vectors added at the write points (`writes`)
therefore reach every later point through one linear map, and with zero writes the output is the clean logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from activations.errors import StrataError

SUPPORTED = ("llama",)


@dataclass
class CleanPass:
    ids: torch.Tensor            # [T] token ids
    embed_TD: torch.Tensor       # embedding vectors entering block 0
    attn_scale: list             # per layer [T, 1]: frozen denominator of the attention input norm
    patterns: list               # per layer [H, T, T]: attention pattern after softmax
    mlp_scale: list              # per layer [T, 1]: frozen denominator of the MLP input norm
    mlp_in: list                 # per layer [T, D]: MLP input (after its norm)
    mlp_out: list                # per layer [T, D]: MLP output
    final_scale: torch.Tensor    # [T, 1]: frozen denominator of the final norm
    logits_TV: torch.Tensor      # [T, V]


def check_architecture(model: nn.Module) -> None:
    kind = getattr(model.config, "model_type", "?")
    if kind not in SUPPORTED or not hasattr(model, "lm_head"):
        raise StrataError(f"attribution graphs support Llama-family causal LMs ({', '.join(SUPPORTED)}); this run's "
                          f"model is {kind!r}: harvest and train on a Llama-family model (e.g. the default smollm2-135m)")


def _denominator(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def _frozen_norm(x: torch.Tensor, scale: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return norm.weight * (x * scale)


def _pattern(attn: nn.Module, h_TD: torch.Tensor, cos, sin) -> torch.Tensor:
    """Softmax attention pattern [H, T, T] of one block (causal), as the model computes it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    T, hd = h_TD.shape[0], attn.head_dim
    q = attn.q_proj(h_TD).view(T, -1, hd).transpose(0, 1)[None]
    k = attn.k_proj(h_TD).view(T, -1, hd).transpose(0, 1)[None]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k = q[0], k[0].repeat_interleave(q.shape[1] // k.shape[1], dim=0)
    scores = (q @ k.transpose(1, 2)) * attn.scaling
    causal = torch.ones(T, T, dtype=torch.bool, device=h_TD.device).triu(1)
    return scores.masked_fill(causal, float("-inf")).softmax(-1, dtype=torch.float32).to(h_TD.dtype)


def _attend(attn: nn.Module, pattern_HTT: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """o_proj(pattern @ V): linear in h for a frozen pattern. h is [..., T, D] (leading dims batch the call)."""
    T, hd, H = h.shape[-2], attn.head_dim, pattern_HTT.shape[0]
    v = attn.v_proj(h).unflatten(-1, (-1, hd)).transpose(-3, -2)          # [..., Hkv, T, hd]
    v = v.repeat_interleave(H // v.shape[-3], dim=-3)                      # [..., H, T, hd]
    out = (pattern_HTT @ v).transpose(-3, -2).reshape(*h.shape[:-2], T, H * hd)
    return attn.o_proj(out)


@torch.no_grad()
def clean_pass(model: nn.Module, ids: torch.Tensor) -> CleanPass:
    """One forward pass over `ids` [T] with the model's own modules, keeping what the replacement freezes;
    checked against the model's own logits (a variant this code does not reproduce is refused)."""
    check_architecture(model)
    inner = model.model
    T = ids.shape[0]
    r = inner.embed_tokens(ids)
    embed = r.clone()
    cos, sin = inner.rotary_emb(r[None], torch.arange(T, device=ids.device)[None])
    attn_scale, patterns, mlp_scale, mlp_in, mlp_out = [], [], [], [], []
    for block in inner.layers:
        s = _denominator(r, block.input_layernorm)
        h = _frozen_norm(r, s, block.input_layernorm)
        p = _pattern(block.self_attn, h, cos, sin)
        r = r + _attend(block.self_attn, p, h)
        s2 = _denominator(r, block.post_attention_layernorm)
        x = _frozen_norm(r, s2, block.post_attention_layernorm)
        y = block.mlp(x)
        r = r + y
        attn_scale.append(s), patterns.append(p), mlp_scale.append(s2), mlp_in.append(x), mlp_out.append(y)
    fs = _denominator(r, inner.norm)
    logits = model.lm_head(_frozen_norm(r, fs, inner.norm))
    reference = model(ids[None]).logits[0]
    if not torch.allclose(logits, reference, atol=1e-3 * float(reference.abs().max()) + 1e-4):
        raise StrataError(f"this {type(model).__name__} variant computes something the frozen replacement does not "
                          f"reproduce (max logit difference {float((logits - reference).abs().max()):.3g}); "
                          f"attribution graphs support plain Llama blocks")
    return CleanPass(ids, embed, attn_scale, patterns, mlp_scale, mlp_in, mlp_out, fs, logits)


def prefix(clean: CleanPass, P: int) -> CleanPass:
    """The clean pass of the first P positions (causal: the same numbers as the whole prompt's)."""
    return CleanPass(clean.ids[:P], clean.embed_TD[:P], [s[:P] for s in clean.attn_scale],
                     [p[:, :P, :P] for p in clean.patterns], [s[:P] for s in clean.mlp_scale],
                     [x[:P] for x in clean.mlp_in], [y[:P] for y in clean.mlp_out], clean.final_scale[:P],
                     clean.logits_TV[:P])


def replacement_forward(model: nn.Module, clean: CleanPass, mlp_const: list, skips: list, writes: dict,
                        upto: int | None = None):
    """The frozen linear residual stream. `mlp_const[L]` [T, D] is the constant part of MLP L's output;
    `skips[L]` a linear map of the MLP input (a transcoder's skip term) or None. `writes` maps "E" (added to the
    embeddings) and layer L (added after MLP L) to [..., T, D] tensors. Returns (mlp_in per layer, logits);
    with `upto` = L it stops after computing MLP L's input and returns no logits."""
    inner = model.model
    r = clean.embed_TD + writes["E"] if "E" in writes else clean.embed_TD
    xs = []
    for L, block in enumerate(inner.layers):
        h = _frozen_norm(r, clean.attn_scale[L], block.input_layernorm)
        r = r + _attend(block.self_attn, clean.patterns[L], h)
        x = _frozen_norm(r, clean.mlp_scale[L], block.post_attention_layernorm)
        xs.append(x)
        if upto is not None and L >= upto:
            return xs, None
        r = r + mlp_const[L]
        if skips[L] is not None:
            r = r + skips[L](x)
        if L in writes:
            r = r + writes[L]
    return xs, model.lm_head(_frozen_norm(r, clean.final_scale, inner.norm))
