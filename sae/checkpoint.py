"""SAE folders and training checkpoints: safetensors for every tensor, JSON for everything else (no pickle).

    RUN/train/<name>/checkpoint/           replaced as a whole (activations.atomic.replace_dir)
        state.json                         step, tokens seen, data position, RNG state, optimizer hyperparameters
        optimizer.safetensors              Adam moments per SAE: "<sae_id>/<param index>/<exp_avg|exp_avg_sq|step>"
        saes/<sae_id>/cfg.json             SAEConfig
        saes/<sae_id>/sae.safetensors      weights + training statistics (firing counts, BatchTopK threshold)

`load_saes(run, name)` / `load_sae(folder)` are the loader every other stage uses.
"""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from activations import layout
from activations.atomic import atomic_path, atomic_write_json, existing_dir, replace_dir
from activations.errors import StrataError
from sae.base import SAE
from sae.config import SAEConfig
from sae.models import build_sae

SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae.safetensors"


def save_sae(sae: SAE, folder) -> None:
    """Write one SAE folder (each file atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    with atomic_path(folder / SAE_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(folder / SAE_CFG, sae.cfg.to_dict())


def load_sae(folder, device: str | torch.device = "cpu", trainable: bool = False) -> SAE:
    """One SAE folder (cfg.json + sae.safetensors) -> SAE in eval mode; encode/decode take raw units.
    Parameters are frozen unless `trainable` (so W_dec.numpy() and encode outputs need no detach)."""
    folder = Path(folder)
    if not (folder / SAE_CFG).is_file() or not (folder / SAE_WEIGHTS).is_file():
        raise StrataError(f"{folder} is not an SAE folder (needs {SAE_CFG} and {SAE_WEIGHTS}); point at RUN/train/<name>/checkpoint/saes/<id>")
    try:
        cfg = SAEConfig.from_dict(json.loads((folder / SAE_CFG).read_text()))
        tensors = load_file(str(folder / SAE_WEIGHTS))
    except (json.JSONDecodeError, TypeError, SafetensorError, OSError) as e:
        raise StrataError(f"{folder} is unreadable ({str(e).splitlines()[0][:120]}); retrain or restore it") from None
    sae = build_sae(cfg)
    missing, unexpected = sae.load_state_dict(tensors, strict=False)
    if [m for m in missing if m not in ("stale_tokens", "fire_count", "tokens_counted")] or unexpected:
        raise StrataError(f"{folder / SAE_WEIGHTS} does not match its cfg.json (missing {missing}, unexpected {unexpected})")
    sae.requires_grad_(trainable)
    return sae.to(device).eval()


def saes_dir(run, name: str) -> Path:
    ckpt = existing_dir(layout.checkpoint_dir(run, name))
    if ckpt is None or not (ckpt / "saes").is_dir():
        raise StrataError(f"no trained SAEs in {layout.train_dir(run, name)}; run `strata train {run} --name {name}` first")
    return ckpt / "saes"


def load_saes(run, name: str, device: str | torch.device = "cpu") -> dict[str, SAE]:
    """{sae_id: SAE} of RUN/train/<name>, in the order they were trained."""
    root = saes_dir(run, name)
    order = json.loads((root.parent / "state.json").read_text()).get("sae_ids", []) if (root.parent / "state.json").is_file() else []
    ids = [i for i in order if (root / i).is_dir()] or sorted(p.name for p in root.iterdir() if p.is_dir())
    return {i: load_sae(root / i, device) for i in ids}


# ---------------------------------------------------------------- training checkpoints
def _rng_to_json(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _rng_from_json(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def write_checkpoint(run, name: str, saes: dict, optimizers: dict, state: dict) -> None:
    """Write the whole checkpoint beside the old one, then swap it in: a kill leaves the old or the new one."""
    final = layout.checkpoint_dir(run, name)
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "saes").mkdir(parents=True)
    try:
        for sae_id, sae in saes.items():
            save_sae(sae, tmp / "saes" / sae_id)
        opt_tensors, groups = {}, {}
        for sae_id, opt in optimizers.items():
            sd = opt.state_dict()
            for idx, st in sd["state"].items():
                for key, val in st.items():
                    opt_tensors[f"{sae_id}/{idx}/{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
            groups[sae_id] = sd["param_groups"]
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        full = dict(state, sae_ids=list(saes), optimizer_param_groups=groups, rng=_rng_to_json(torch.get_rng_state()))
        atomic_write_json(tmp / "state.json", full)
        replace_dir(tmp, final, "checkpoint")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_checkpoint(run, name: str) -> tuple[dict, Path] | None:
    ckpt = existing_dir(layout.checkpoint_dir(run, name))
    if ckpt is None or not (ckpt / "state.json").is_file():
        return None
    return json.loads((ckpt / "state.json").read_text()), ckpt


def restore_optimizers(ckpt: Path, state: dict, optimizers: dict) -> None:
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    for sae_id, opt in optimizers.items():
        per: dict = {}
        for key, val in tensors.items():
            sid, idx, name = key.rsplit("/", 2)
            if sid == sae_id:
                per.setdefault(int(idx), {})[name] = val
        opt.load_state_dict({"state": per, "param_groups": state["optimizer_param_groups"][sae_id]})
        # safetensors stores row-major copies; give each moment its parameter's memory layout again (W_enc is
        # latent-major), as the fused Adam kernel walks parameter and moments with the same strides
        for group in opt.param_groups:
            for p in group["params"]:
                for name, val in opt.state.get(p, {}).items():
                    if torch.is_tensor(val) and val.shape == p.shape and val.stride() != p.stride():
                        opt.state[p][name] = torch.empty_like(p, dtype=val.dtype).copy_(val)


def restore_rng(state: dict) -> None:
    torch.set_rng_state(_rng_from_json(state["rng"]))
