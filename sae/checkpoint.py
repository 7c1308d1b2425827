"""SAE folders and training checkpoints: safetensors for every tensor, JSON for everything else (no pickle).

    RUN/train/<name>/checkpoint/           replaced as a whole (activations.atomic.replace_dir)
        state.json                         step, tokens seen, data position, RNG state, optimizer hyperparameters
        optimizer.safetensors              Adam moments per SAE: "<sae_id>/<param index>/<exp_avg|exp_avg_sq|step>"
        saes/<sae_id>/cfg.json             SAEConfig
        saes/<sae_id>/sae.safetensors      weights + training statistics (firing counts, BatchTopK threshold)
        .strata-owned                      ownership marker, kind "checkpoint" (activations/ownership.py)

`load_saes(run, name)` / `load_sae(folder)` are the loader every other stage uses. A damaged state.json or
optimizer.safetensors is a one-line StrataError naming the file (restore it, or retrain with --overwrite).
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
from activations.ownership import mark
from sae.base import SAE
from sae.config import SAEConfig
from sae.models import build_sae

SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae.safetensors"
STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"


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
        raise StrataError(f"{folder} is not an SAE folder (needs {SAE_CFG} and {SAE_WEIGHTS}); "
                          "point at RUN/train/<name>/checkpoint/saes/<id>")
    try:
        cfg = SAEConfig.from_dict(json.loads((folder / SAE_CFG).read_text()))
        tensors = load_file(str(folder / SAE_WEIGHTS))
    except (json.JSONDecodeError, TypeError, AttributeError, SafetensorError, OSError) as e:
        raise StrataError(f"{folder} is unreadable ({str(e).splitlines()[0][:120]}); retrain or restore it") from None
    sae = build_sae(cfg)
    expected = sae.state_dict()  # the file's names and shapes; a buffer an older file lacks keeps its initial value
    buffers = {name for name, _ in sae.named_buffers()}
    missing = [k for k in expected if k not in tensors and k not in buffers]
    unexpected = [k for k in tensors if k not in expected]
    misshaped = [k for k in tensors if k in expected and tensors[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        raise StrataError(f"{folder / SAE_WEIGHTS} does not match its cfg.json (missing {missing}, unexpected "
                          f"{unexpected}, wrong shape {misshaped}); retrain or restore it")
    sae.load_state_dict(tensors, strict=False)
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
    order = read_state(root.parent / STATE)["sae_ids"] if (root.parent / STATE).is_file() else []
    ids = [i for i in order if (root / i).is_dir()] or sorted(p.name for p in root.iterdir() if p.is_dir())
    return {i: load_sae(root / i, device) for i in ids}


# ---------------------------------------------------------------- training checkpoints
def _rng_to_json(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _rng_from_json(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _unreadable(path: Path, why: str = "") -> StrataError:
    why = f" ({why.splitlines()[0][:120]})" if why else ""
    return StrataError(f"{path} is unreadable{why}: restore it, or retrain with --overwrite")


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, checked for the fields training and loading use."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _unreadable(path, str(e)) from None
    ok = (isinstance(state, dict) and isinstance(state.get("sae_ids"), list)
          and all(isinstance(i, str) for i in state["sae_ids"])
          and all(isinstance(state.get(k), int) for k in ("step", "tokens")))
    if not ok:
        raise _unreadable(path, "not the state Strata writes: sae_ids, step, tokens")
    return state


def write_checkpoint(run, name: str, saes: dict, optimizers: dict, state: dict) -> None:
    """Write the whole checkpoint beside the old one, then swap it in: a kill leaves the old or the new one.
    The folder being written (checkpoint.partial) is marked as Strata's from the start; one left by a kill
    is replaced by the next write (it lies inside train/<name>, which the caller has checked is Strata's)."""
    final = layout.checkpoint_dir(run, name)
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "saes").mkdir(parents=True)
    mark(tmp, "checkpoint")
    try:
        for sae_id, sae in saes.items():
            save_sae(sae, tmp / "saes" / sae_id)
        opt_tensors, groups = {}, {}
        for sae_id, opt in optimizers.items():
            groups[sae_id] = optimizer_tensors(sae_id, saes[sae_id], opt, opt_tensors)
        save_file(opt_tensors, str(tmp / OPTIMIZER))
        full = dict(state, sae_ids=list(saes), optimizer_param_groups=groups, rng=_rng_to_json(torch.get_rng_state()))
        atomic_write_json(tmp / STATE, full)
        replace_dir(tmp, final, "checkpoint")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _disk_transposed(sae: SAE, opt) -> set[int]:
    """Indices, in the optimizer's parameter list, of the parameters whose file layout is their transpose
    (SAE.disk_transposed): their Adam moments are stored transposed too, as the weights are."""
    params = {id(getattr(sae, name)) for name in sae.disk_transposed}
    return {i for i, p in enumerate(opt.param_groups[0]["params"]) if id(p) in params}


def optimizer_tensors(sae_id: str, sae: SAE, opt, out: dict) -> list:
    """Add one SAE's Adam state to `out` as optimizer.safetensors holds it ("<sae_id>/<param index>/<name>", row-major
    copies in the file layout); returns the optimizer's param_groups for state.json."""
    sd = opt.state_dict()
    transposed = _disk_transposed(sae, opt)
    for idx, st in sd["state"].items():
        for key, val in st.items():
            val = torch.as_tensor(val).detach()
            if idx in transposed and val.dim() == 2:
                val = val.t()
            out[f"{sae_id}/{idx}/{key}"] = val.cpu().contiguous()
    return sd["param_groups"]


def read_checkpoint(run, name: str) -> tuple[dict, Path] | None:
    """(state, folder) of the latest complete checkpoint of train/<name>, None when there is none yet;
    StrataError naming the file when its state.json cannot be read."""
    ckpt = existing_dir(layout.checkpoint_dir(run, name))
    if ckpt is None or not (ckpt / STATE).is_file():
        return None
    return read_state(ckpt / STATE), ckpt


def restore_optimizers(ckpt: Path, state: dict, saes: dict, optimizers: dict) -> None:
    """Adam moments of every SAE (`optimizers` keyed as `saes`) from optimizer.safetensors, checked against the
    parameters they belong to (a missing or mis-shaped moment would silently restart or crash the optimiser)."""
    path = ckpt / OPTIMIZER
    groups = state.get("optimizer_param_groups")
    if not isinstance(groups, dict):
        raise _unreadable(ckpt / STATE, "no optimizer_param_groups")
    try:
        per_sae: dict = {}
        for key, val in load_file(str(path)).items():
            sid, idx, name = key.rsplit("/", 2)
            per_sae.setdefault(sid, {}).setdefault(int(idx), {})[name] = val
    except (OSError, SafetensorError, ValueError) as e:
        raise _unreadable(path, str(e)) from None
    for sae_id, opt in optimizers.items():
        per = per_sae.get(sae_id, {})
        params = opt.param_groups[0]["params"]
        transposed = _disk_transposed(saes[sae_id], opt)
        per = {i: {name: v.t().contiguous() if i in transposed and v.dim() == 2 else v for name, v in st.items()}
               for i, st in per.items()}
        mismatched = (not per and int(state["step"]) > 0) or any(
            i >= len(params) or any(torch.is_tensor(v) and v.dim() > 0 and v.shape != params[i].shape for v in st.values())
            for i, st in per.items())
        if mismatched:
            raise _unreadable(path, f"the moments of SAE {sae_id} do not match its parameters")
        try:
            opt.load_state_dict({"state": per, "param_groups": groups[sae_id]})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise _unreadable(ckpt / STATE, f"optimizer_param_groups of {sae_id}: {e}") from None


def restore_rng(state: dict) -> None:
    try:
        rng = _rng_from_json(state["rng"])
        torch.set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise StrataError(f"the rng of the checkpoint's {STATE} is unreadable ({str(e).splitlines()[0][:80]}): "
                          f"restore it, or retrain with --overwrite") from None
