"""Training modes: which SAEs a run trains and how each one gets (input, target) from a batch.

- layer:       one SAE per key (the per-layer bank); every SAE steps on its own key of the same batch.
- multilayer:  one SAE for the vectors of every key (MLSAE, arXiv 2409.04185): the layer axis is folded into
               the batch, each key has its own normalisation scalar, and the loss is the mean over layers of
               each layer's FVU so every layer counts equally.
- transcoder:  encode mlp_in.L, reconstruct mlp_out.L (optional learned skip).
- crosscoder:  one latent space reading the concatenation of every key of a token and writing all of them;
               loss = sum over layers of each layer's FVU.
- clt:         cross-layer transcoder (sae/clt.py): x = the mlp_in blocks of every selected layer, y = their
               mlp_out blocks; latents of layer L write mlp_out of L and every later layer; loss = sum over
               output layers of each layer's FVU.
A Unit is derived from its SAE's cfg alone, so a resumed or loaded SAE gets the same unit as a fresh one.

Choices where peers differ: normalisation is one scalar per key with E||x||^2 = d (dictionary_learning), not
per-vector standardisation (OpenAI v5, MLSAE), so encode/decode stay affine in raw units and the scalar can be
folded into exported weights; b_dec starts at the geometric median (OpenAI, dictionary_learning), which the few
huge-norm tokens (BOS / attention sinks) cannot drag the way they drag the mean; the reconstruction loss is FVU
for every architecture (sparsify), so one learning-rate rule works across layers, widths and modes.
"""
from __future__ import annotations

import copy
import re

import torch

from activations.errors import StrataError
from activations.hooks import parse_layers, split_key
from sae.base import FVU, SAE
from sae.clt import CLT_ARCHS, check_fits
from sae.config import SAEConfig
from sae.train_config import TrainConfig


class Unit:
    """One SAE and the recipe for its inputs; `parts` splits a reconstruction per key for per-layer metrics."""

    def __init__(self, sae_id: str, sae: SAE):
        self.sae_id, self.sae = sae_id, sae
        cfg = sae.cfg
        self.in_keys, self.out_keys = list(cfg.in_keys), list(cfg.out_keys)
        self.needed_keys = sorted(set(self.in_keys) | set(self.out_keys))
        dev = sae.W_dec.device
        self.in_s = [torch.tensor(float(s), device=dev) for s in cfg.in_scales]
        self.out_s = [torch.tensor(float(s), device=dev) for s in cfg.out_scales]
        self.loss_fn = _loss(cfg.mode, len(self.in_keys), len(self.out_keys))

    def io(self, acts: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) in normalised units."""
        mode = self.sae.cfg.mode
        if mode == "multilayer":
            x = torch.cat([acts[k] * s for k, s in zip(self.in_keys, self.in_s)])
            return x, x
        if mode == "crosscoder":
            x = torch.cat([acts[k] * s for k, s in zip(self.in_keys, self.in_s)], dim=1)
            return x, x
        if mode == "clt":
            x = torch.cat([acts[k] * s for k, s in zip(self.in_keys, self.in_s)], dim=1)
            y = torch.cat([acts[k] * s for k, s in zip(self.out_keys, self.out_s)], dim=1)
            return x, y
        x = acts[self.in_keys[0]] * self.in_s[0]
        y = x if self.out_keys == self.in_keys else acts[self.out_keys[0]] * self.out_s[0]
        return x, y

    def parts(self, y: torch.Tensor, recon: torch.Tensor) -> dict:
        mode = self.sae.cfg.mode
        if mode == "multilayer":
            return dict(zip(self.in_keys, zip(y.chunk(len(self.in_keys)), recon.chunk(len(self.in_keys)))))
        if mode == "crosscoder":
            n = len(self.in_keys)
            return dict(zip(self.in_keys, zip(y.chunk(n, dim=1), recon.chunk(n, dim=1))))
        if mode == "clt":
            n = len(self.out_keys)
            return dict(zip(self.out_keys, zip(y.chunk(n, dim=1), recon.chunk(n, dim=1))))
        return {self.out_keys[0]: (y, recon)}


def _loss(mode: str, n_in: int, n_out: int) -> FVU:
    """The mode's reconstruction loss (see the module docstring)."""
    if mode == "multilayer":
        return FVU(blocks=n_in, dim=0, reduce="mean")
    if mode == "crosscoder":
        return FVU(blocks=n_in, dim=1, reduce="sum")
    if mode == "clt":
        return FVU(blocks=n_out, dim=1, reduce="sum")
    return FVU()


def select_keys(cfg: TrainConfig, run_keys: list[str], n_layers: int) -> list[str]:
    """Keys for sites x layers; 'all' layers means every harvested layer of the site."""
    mlp = cfg.mode in ("transcoder", "clt")
    sites = ["mlp_in"] if mlp else [s.strip() for s in cfg.sites.split(",") if s.strip()]
    keys = []
    for site in sites:
        have = sorted((k for k in run_keys if k.rpartition(".")[0] == site), key=lambda k: split_key(k)[1])
        if cfg.layers.strip() in ("", "all"):
            if not have and mlp:
                raise StrataError(f"{cfg.mode} mode reads mlp_in and mlp_out but the run has no mlp_in activations "
                                  f"(harvested: {', '.join(run_keys)}); re-harvest with `strata harvest "
                                  f"{cfg.run_dir} --sites mlp_in,mlp_out` (plus the sites you already have)")
            if not have:
                raise StrataError(f"the run has no {site} activations (harvested: {', '.join(run_keys)}); "
                                  f"re-harvest with --sites {site} or pick --sites from those")
            keys += have
            continue
        upper = n_layers if site == "resid" else n_layers - 1
        for layer in parse_layers(cfg.layers, upper):
            key = f"{site}.{layer}"
            if key not in run_keys and mlp:
                raise StrataError(f"{cfg.mode} mode reads mlp_in and mlp_out but the run lacks {key} (harvested: "
                                  f"{', '.join(run_keys)}); re-harvest with `strata harvest {cfg.run_dir} --sites "
                                  f"mlp_in,mlp_out --layers {cfg.layers}` (plus the sites you already have)")
            if key not in run_keys:
                raise StrataError(f"the run lacks {key} (harvested: {', '.join(run_keys)}); pick --sites/--layers "
                                  f"from those or re-harvest with them")
            keys.append(key)
    if mlp:
        for key in keys:
            out = "mlp_out." + key.rpartition(".")[2]
            if out not in run_keys:
                raise StrataError(f"{cfg.mode} mode needs {out} for {key}; re-harvest with `strata harvest "
                                  f"{cfg.run_dir} --sites mlp_in,mlp_out` (plus the sites you already have)")
    return keys


def sae_configs(cfg: TrainConfig, keys: list[str], dims: dict, model: dict, context_length: int) -> dict:
    """{sae_id: SAEConfig} (normalisation scales still empty) for the run's selected keys."""
    d = dims[keys[0]]
    for key in keys:
        if dims[key] != d:
            raise StrataError(f"{key} has width {dims[key]} but {keys[0]} has {d}; train them in separate runs")
    if cfg.d_model and cfg.d_model != d:
        raise StrataError(f"--d-model {cfg.d_model} does not match the shards' width {d}; drop --d-model or use the right run")
    n = cfg.n_latents or cfg.expansion * d
    if n <= 0:
        raise StrataError(f"dictionary size {n} must be positive; set --n-latents or --expansion")
    if cfg.arch != "relu" and not 0 < cfg.k < n:
        raise StrataError(f"k={cfg.k} must be at least 1 and below the number of latents ({n}); lower --k or raise --expansion")
    if cfg.sparsity == "tanh" and (cfg.mode, cfg.arch) != ("clt", "jumprelu"):
        raise StrataError(f"--sparsity tanh is the cross-layer transcoder's JumpReLU penalty, not for --mode {cfg.mode} "
                          f"--arch {cfg.arch}; use --mode clt --arch jumprelu, or drop --sparsity")
    prefixes = [int(p) for p in cfg.matryoshka_prefixes.split(",") if p.strip()] or sorted({max(1, n // 16), max(1, n // 4), n})
    common = {"arch": cfg.arch, "n_latents": n, "k": None if cfg.arch == "relu" else cfg.k, "aux_coef": cfg.aux_coef,
              "dead_tokens": cfg.dead_tokens, "l1_coef": cfg.l1_coef if cfg.arch == "relu" else 0.0,
              "l0_coef": cfg.l0_coef if cfg.arch == "jumprelu" else 0.0, "jumprelu_bandwidth": cfg.jumprelu_bandwidth,
              "matryoshka_prefixes": prefixes if cfg.arch == "matryoshka" else [],
              "normalize_decoder": cfg.arch != "relu", "model_id": str(model.get("id", "")),
              "context_length": context_length, "dtype": "float32"}

    def k_aux(d_out):
        if cfg.arch not in ("topk", "batchtopk", "matryoshka") or cfg.k_aux < 0:
            return 0
        return min(cfg.k_aux or d_out // 2, n // 2)

    out = {}
    if cfg.mode == "layer":
        for key in keys:
            out[key] = SAEConfig(d_in=d, d_out=d, mode="layer", in_keys=[key], out_keys=[key], k_aux=k_aux(d), **common)
    elif cfg.mode == "multilayer":
        out["multilayer"] = SAEConfig(d_in=d, d_out=d, mode="multilayer", in_keys=keys, out_keys=keys,
                                      k_aux=k_aux(d), **common)
    elif cfg.mode == "transcoder":
        for key in keys:
            layer = key.rpartition(".")[2]
            c = dict(common, normalize_decoder=False)
            out[f"transcoder.{layer}"] = SAEConfig(d_in=d, d_out=d, mode="transcoder", in_keys=[key],
                                                   out_keys=[f"mlp_out.{layer}"], skip=cfg.skip,
                                                   apply_b_dec_to_input=False, k_aux=k_aux(d), **c)
    elif cfg.mode == "crosscoder":
        D = d * len(keys)
        out["crosscoder"] = SAEConfig(d_in=D, d_out=D, mode="crosscoder", in_keys=keys, out_keys=keys,
                                      k_aux=min(k_aux(d), n // 2), **common)
    elif cfg.mode == "clt":
        if cfg.arch not in CLT_ARCHS:
            raise StrataError(f"clt mode supports --arch {', '.join(CLT_ARCHS)}, not {cfg.arch}; pick one of those")
        from activations.model import resolve_device
        print(check_fits(len(keys), d, n, cfg.arch, resolve_device(cfg.device)))
        outs = [f"mlp_out.{k.rpartition('.')[2]}" for k in keys]
        c = dict(common, normalize_decoder=False, n_latents=n * len(keys), sparsity=cfg.sparsity)
        if cfg.sparsity == "tanh":
            c.update(l0_coef=0.0, tanh_coef=cfg.tanh_coef, tanh_c=cfg.tanh_c, pre_act_coef=cfg.pre_act_coef)
        out["clt"] = SAEConfig(d_in=d * len(keys), d_out=d * len(keys), mode="clt", in_keys=keys, out_keys=outs,
                               apply_b_dec_to_input=False, k_aux=k_aux(d), **c)
    else:
        raise StrataError(f"unknown mode {cfg.mode!r}; choose layer, multilayer, transcoder, crosscoder or clt")
    seeds = cfg.seed_list()
    if seeds is None:
        return out
    return {seeded_id(sid, s): copy.deepcopy(c) for sid, c in out.items() for s in seeds}


_SEEDED = re.compile(r"(.+)\.s(\d+)")


def seeded_id(sae_id: str, seed: int) -> str:
    """The id of the SAE trained from `seed` under `strata train --seeds`: "resid.3" -> "resid.3.s1"."""
    return f"{sae_id}.s{seed}"


def split_seed(sae_id: str) -> tuple[str, int | None]:
    """"resid.3.s1" -> ("resid.3", 1); an id trained without --seeds -> (sae_id, None)."""
    m = _SEEDED.fullmatch(sae_id)
    return (m[1], int(m[2])) if m else (sae_id, None)


def check_exclude_first(n: int, context_length: int, source: str = "--exclude-first") -> None:
    """Positions left out of every context must leave at least one: 0 <= n < the run's context length."""
    if not 0 <= n < context_length:
        raise StrataError(f"{source} {n} must be at least 0 and below the run's context length ({context_length} "
                          f"tokens), or no token is left; pass --exclude-first between 0 and {context_length - 1}")


def norm_scale(x: torch.Tensor, key: str = "") -> float:
    """The scalar s with E||s x||^2 = d on this sample."""
    if not bool(torch.isfinite(x).all()):
        raise StrataError(f"the activations of {key} contain NaN/inf; run `strata verify RUN` to find the shard and re-harvest it")
    ms = float(x.double().pow(2).sum(1).mean())
    if not ms > 0:
        raise StrataError("activations in the sample are all zero; check the harvest (strata verify RUN)")
    return (x.shape[1] / ms) ** 0.5
