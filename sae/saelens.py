"""SAELens interop: `strata export --format saelens` and `strata import`.

SAELens' saved-SAE folder (checked against sae_lens 6.x, `SAE.load_from_disk`): cfg.json (architecture, d_in,
d_sae, dtype, device, apply_b_dec_to_input, normalize_activations, reshape_activations, k for topk, metadata
with model_name / hook_name / context_size / prepend_bos / dataset_path), sae_weights.safetensors (W_enc
[d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, threshold for jumprelu) and sparsity.safetensors ("sparsity":
log10 firing frequency per latent).
Our normalisation scalar s is folded into the weights so the SAELens SAE takes raw activations:
W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s (encodings are unchanged). BatchTopK and Matryoshka
export as jumprelu with their inference threshold; relu exports as "standard". Per-layer and multi-layer SAEs
export (a multi-layer SAE gives one folder per layer, each with that layer's scalar); transcoders and
crosscoders have no SAELens equivalent with our layout and are refused.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from activations import layout
from activations.atomic import atomic_write_json, replace_dir
from activations.errors import StrataError
from activations.manifest import load_manifest
from sae.checkpoint import load_saes, write_checkpoint
from sae.config import SAEConfig
from sae.models import build_sae

CFG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
_EXPORT_ARCH = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                "matryoshka": "jumprelu"}
_HOOKS = [(r"blocks\.(\d+)\.hook_resid_pre", "resid.{}", 0), (r"blocks\.(\d+)\.hook_resid_post", "resid.{}", 1),
          (r"blocks\.(\d+)\.hook_mlp_out", "mlp_out.{}", 0), (r"blocks\.(\d+)\.ln2\.hook_normalized", "mlp_in.{}", 0),
          (r"blocks\.(\d+)\.hook_attn_out", "attn_out.{}", 0)]


def _hook_name(key: str) -> str:
    site, _, layer = key.rpartition(".")
    return {"resid": f"blocks.{layer}.hook_resid_pre", "mlp_out": f"blocks.{layer}.hook_mlp_out",
            "mlp_in": f"blocks.{layer}.ln2.hook_normalized", "attn_out": f"blocks.{layer}.hook_attn_out"}[site]


def _key_from_hook(hook: str) -> str | None:
    for pattern, fmt, offset in _HOOKS:
        m = re.fullmatch(pattern, hook or "")
        if m:
            return fmt.format(int(m.group(1)) + offset)
    return None


def _write_folder(folder: Path, cfg: dict, tensors: dict, sparsity: torch.Tensor) -> None:
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        save_file({"sparsity": sparsity.float().contiguous()}, str(tmp / SPARSITY))
        (tmp / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
        replace_dir(tmp, folder, "saelens-export")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@torch.no_grad()
def export_saelens(run, name: str, out, only: str | None = None) -> list[Path]:
    saes = load_saes(run, name)
    if only is not None:
        if only not in saes:
            raise StrataError(f"no SAE {only!r} in {name}; it has {', '.join(saes)}")
        saes = {only: saes[only]}
    bad = [sid for sid, s in saes.items() if s.cfg.mode in ("transcoder", "crosscoder")]
    if bad:
        raise StrataError(f"SAELens has no folder format for our {saes[bad[0]].cfg.mode} {bad[0]}; export per-layer or multi-layer SAEs (--sae)")
    manifest = load_manifest(run)
    written = []
    for sid, sae in saes.items():
        c = sae.cfg
        density = sae.fire_count / sae.tokens_counted.clamp_min(1)
        sparsity = torch.log10(density + 1e-10)
        for key, s in zip(c.in_keys, c.in_scales):
            tensors = {"W_enc": sae.W_enc * s, "W_dec": sae.W_dec / s, "b_enc": sae.b_enc.clone(), "b_dec": sae.b_dec / s}
            arch = _EXPORT_ARCH[c.arch]
            if c.arch == "jumprelu":
                tensors["threshold"] = sae.threshold.clone()
            elif c.arch in ("batchtopk", "matryoshka"):
                tensors["threshold"] = sae.threshold.expand(c.n_latents).clone()
            cfg = {"architecture": arch, "d_in": c.d_in, "d_sae": c.n_latents, "dtype": "float32", "device": "cpu",
                   "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": "none",
                   "reshape_activations": "none",
                   "metadata": {"model_name": manifest.model.get("id", c.model_id), "hook_name": _hook_name(key),
                                "hook_head_index": None, "context_size": manifest.context_length,
                                "prepend_bos": bool(manifest.tokenizer.get("bos_per_context", False)),
                                "dataset_path": manifest.corpus.get("name", ""), "strata_key": key,
                                "strata_sae_id": sid, "strata_arch": c.arch, "strata_tokens_seen": c.tokens_seen}}
            if arch == "topk":
                cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
            folder = Path(out) / (sid if len(c.in_keys) == 1 else f"{sid}.{key}")
            _write_folder(folder, cfg, tensors, sparsity)
            written.append(folder)
    return written


def import_saelens(run, folder, name: str, key: str | None = None) -> Path:
    folder = Path(folder)
    if not (folder / CFG).is_file() or not (folder / WEIGHTS).is_file():
        raise StrataError(f"{folder} is not a SAELens SAE folder (needs {CFG} and {WEIGHTS})")
    try:
        cfg = json.loads((folder / CFG).read_text())
        w = load_file(str(folder / WEIGHTS))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise StrataError(f"{folder} is unreadable ({str(e).splitlines()[0][:120]})") from None
    arch = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(cfg.get("architecture", "standard"))
    if arch is None:
        raise StrataError(f"SAELens architecture {cfg.get('architecture')!r} is not supported; import standard, topk or jumprelu SAEs")
    if cfg.get("normalize_activations", "none") != "none" or cfg.get("rescale_acts_by_decoder_norm"):
        raise StrataError(f"{folder}: activation normalisation {cfg.get('normalize_activations')!r} / decoder-norm rescaling "
                          f"is not supported; fold it into the weights in SAELens first")
    meta = cfg.get("metadata") or {}
    key = key or meta.get("strata_key") or _key_from_hook(meta.get("hook_name") or cfg.get("hook_name", ""))
    if key is None:
        raise StrataError(f"cannot tell which activation {folder} reads (hook {meta.get('hook_name')!r}); pass --key, e.g. resid.3")
    manifest = load_manifest(run)
    if key not in manifest.dims:
        raise StrataError(f"the run has no {key} activations (it has {', '.join(manifest.keys)}); pass --key with one of those")
    d_in, n = int(cfg["d_in"]), int(cfg["d_sae"])
    if d_in != int(manifest.dims[key]) or tuple(w["W_enc"].shape) != (d_in, n):
        raise StrataError(f"{folder} has d_in {d_in} (W_enc {tuple(w['W_enc'].shape)}) but {key} has width {manifest.dims[key]}; pick the matching run or --key")
    tdir = layout.train_dir(run, name)
    if tdir.exists():
        raise StrataError(f"{tdir} exists; choose another --name")
    sc = SAEConfig(arch=arch, d_in=d_in, d_out=d_in, n_latents=n, k=cfg.get("k") if arch == "topk" else None,
                   mode="layer", in_keys=[key], out_keys=[key], in_scales=[1.0], out_scales=[1.0],
                   apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), normalize_decoder=False,
                   model_id=str(meta.get("model_name", "")), context_length=int(meta.get("context_size") or 0))
    sae = build_sae(sc)
    with torch.no_grad():
        for p in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, p).copy_(w[p].float())
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.log(w["threshold"].float().clamp_min(1e-12)))
        if (folder / SPARSITY).is_file():
            sae.fire_count.copy_(10 ** load_file(str(folder / SPARSITY))["sparsity"].double())
            sae.tokens_counted.fill_(1.0)
    try:
        write_checkpoint(run, name, {key: sae}, {}, {"step": 0, "tokens": 0, "done": True, "name": name,
                                                       "imported_from": str(folder.resolve())})
        atomic_write_json(tdir / "config.json", {"identity": {"imported_from": str(folder.resolve())}, "config": {}})
    except BaseException:
        shutil.rmtree(tdir, ignore_errors=True)
        raise
    return tdir
