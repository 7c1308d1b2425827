"""One place that maps an architecture name to its module: build_sae(cfg)."""
from __future__ import annotations

from activations.errors import StrataError
from activations.precision import Precision, resolve
from sae.base import SAE
from sae.clt import CrossLayerTranscoder
from sae.config import ARCHS, SAEConfig
from sae.jumprelu import JumpReLUSAE
from sae.relu import ReLUSAE
from sae.topk import BatchTopKSAE, MatryoshkaSAE, TopKSAE

SAE_CLASSES = {"relu": ReLUSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE,
               "matryoshka": MatryoshkaSAE}


def build_sae(cfg: SAEConfig) -> SAE:
    if cfg.arch not in SAE_CLASSES:
        raise StrataError(f"unknown architecture {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    if cfg.mode == "clt":
        return CrossLayerTranscoder(cfg)
    if cfg.arch in ("topk", "batchtopk", "matryoshka") and (cfg.k is None or not 0 < cfg.k < cfg.n_latents):
        raise StrataError(f"k={cfg.k} must be between 1 and n_latents-1 ({cfg.n_latents - 1}); lower --k or raise --expansion")
    if cfg.arch == "matryoshka":
        p = list(cfg.matryoshka_prefixes)
        if not p or p != sorted(p) or p[-1] != cfg.n_latents or p[0] <= 0:
            raise StrataError(f"matryoshka prefixes {p} must increase and end at n_latents={cfg.n_latents}")
    return SAE_CLASSES[cfg.arch](cfg)


def use_precision(saes: dict, requested: str, batch_size: int, device) -> Precision:
    """Resolve --precision for the encoder matmuls of `saes` ([batch, d_in] x [d_in, n_latents]) and have every
    SAE compute in it (weights stay fp32). Eval and analyze use this; training resolves across processes."""
    prec = resolve(requested, device, {(batch_size, s.cfg.d_in, s.cfg.n_latents) for s in saes.values()})
    for sae in saes.values():
        sae.set_compute_dtype(prec.dtype)
    return prec
