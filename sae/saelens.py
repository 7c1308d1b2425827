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
crosscoders have no SAELens equivalent with our layout and are refused. Every folder the export will replace
(and its .partial / .old) is checked before anything is written: only an earlier Strata export is replaced.
Import: see saelens_read.py for what is checked and folded (decoder-norm rescaling, a stored input scalar);
what was folded is recorded in the imported SAE's cfg.json ("imported").
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from activations import layout
from activations.atomic import staged_dir
from activations.errors import StrataError
from activations.lock import run_lock
from activations.manifest import load_manifest
from activations.ownership import check_swap_target
from sae import train_folder
from sae.checkpoint import load_saes, write_checkpoint
from sae.config import SAEConfig
from sae.models import build_sae
from sae.saelens_read import CFG, SPARSITY, WEIGHTS, read_saelens

KIND = "saelens-export"
_HINT = "choose another --out folder"
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
    """Write one SAELens folder beside its final place (<folder>.partial, marked as Strata's from the start so
    a leftover from a kill is recognisably ours) and swap it in (replace_dir)."""
    try:
        with staged_dir(folder, KIND) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
            save_file({"sparsity": sparsity.float().contiguous()}, str(tmp / SPARSITY))
            (tmp / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    except OSError as e:
        raise StrataError(f"cannot write {folder} ({e.strerror or e}); choose an --out folder you can write to") from None


def _check_out(out: Path, folders: list[Path]) -> None:
    """Refuse before anything is written: --out must be a folder (or missing), and every SAE folder the export
    will replace, and its .partial / .old, must be missing, empty or an earlier Strata export."""
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            raise StrataError(f"--out {out}: {p} is a file, not a folder; nothing was written: {_HINT}")
    for folder in folders:
        check_swap_target(folder, KIND, _HINT)


@torch.no_grad()
def export_saelens(run, name: str, out, only: str | None = None) -> list[Path]:
    layout.check_name(name)
    saes = load_saes(run, name)
    if only is not None:
        if only not in saes:
            raise StrataError(f"no SAE {only!r} in {name}; it has {', '.join(saes)}")
        saes = {only: saes[only]}
    bad = [sid for sid, s in saes.items() if s.cfg.mode in ("transcoder", "crosscoder", "clt")]
    if bad:
        raise StrataError(f"SAELens has no folder format for our {saes[bad[0]].cfg.mode} {bad[0]}; "
                          "export per-layer or multi-layer SAEs (--sae)")
    manifest = load_manifest(run)
    out = Path(out)
    plan = [(sid, key, s, out / (sid if len(sae.cfg.in_keys) == 1 else f"{sid}.{key}"))
            for sid, sae in saes.items() for key, s in zip(sae.cfg.in_keys, sae.cfg.in_scales)]
    _check_out(out, [folder for *_, folder in plan])
    written = []
    for sid, key, s, folder in plan:
        sae = saes[sid]
        c = sae.cfg
        density = sae.fire_count / sae.tokens_counted.clamp_min(1)
        sparsity = torch.log10(density + 1e-10)
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
        _write_folder(folder, cfg, tensors, sparsity)
        written.append(folder)
    return written


def import_saelens(run, folder, name: str, key: str | None = None) -> Path:
    """A SAELens folder -> RUN/train/<name> (a one-SAE checkpoint): checked and folded by saelens_read, under
    the run's "train-<name>" lock, into a new training folder (never over an existing one)."""
    layout.check_name(name)
    tdir = layout.train_dir(run, name)
    if tdir.exists() or tdir.is_symlink():
        raise StrataError(f"{tdir} exists; choose another --name")
    folder = Path(folder)
    src = read_saelens(folder)
    key = key or src.strata_key or _key_from_hook(src.hook_name)
    if key is None:
        raise StrataError(f"cannot tell which activation {folder} reads (hook {src.hook_name!r}); pass --key, e.g. resid.3")
    manifest = load_manifest(run)
    if key not in manifest.dims:
        raise StrataError(f"the run has no {key} activations (it has {', '.join(manifest.keys)}); pass --key with one of those")
    if src.d_in != int(manifest.dims[key]):
        raise StrataError(f"{folder} has d_in {src.d_in} but {key} has width {manifest.dims[key]}; pick the matching run or --key")
    source = {"format": "saelens", "folder": str(folder.resolve()), "hook_name": src.hook_name, "folded": src.folded}
    sc = SAEConfig(arch=src.arch, d_in=src.d_in, d_out=src.d_in, n_latents=src.d_sae, k=src.k, mode="layer",
                   in_keys=[key], out_keys=[key], in_scales=[src.input_scale], out_scales=[src.input_scale],
                   apply_b_dec_to_input=src.apply_b_dec_to_input, normalize_decoder=False,
                   model_id=src.model_name, context_length=src.context_size, imported=source)
    sae = build_sae(sc)
    with torch.no_grad():
        for p in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, p).copy_(src.tensors[p])
        if src.arch == "jumprelu":
            sae.log_threshold.copy_(torch.log(src.tensors["threshold"].clamp_min(1e-12)))
        if src.log_sparsity is not None:
            sae.fire_count.copy_(10 ** src.log_sparsity)
            sae.tokens_counted.fill_(1.0)
    with run_lock(run, f"strata import --name {name}", scope=f"train-{name}"):
        if tdir.exists() or tdir.is_symlink():
            raise StrataError(f"{tdir} exists; choose another --name")
        made = train_folder.create(tdir, {"identity": {"imported_from": source["folder"]}, "config": {}})
        try:
            write_checkpoint(run, name, {key: sae}, {}, {"step": 0, "tokens": 0, "done": True, "name": name,
                                                           "imported_from": source["folder"]})
        except OSError as e:
            train_folder.remove_created(made)
            raise StrataError(f"cannot write {tdir} ({e.strerror or e}); make the run directory writable") from None
        except BaseException:
            train_folder.remove_created(made)
            raise
    return tdir
