"""`strata eval`: trained SAEs on the run's held-out shards.

Per SAE and per key: FVU / explained variance, MSE (raw units), cosine, shrinkage, relative reconstruction
bias, L0, alive/dead/dense fractions (metrics.py); then the downstream cost of the reconstruction: the SAE is
spliced into the model at its key (activations.hooks.splice) on held-out contexts and compared with the clean
forward and with zero-ablation of that key:
    CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean);  KL recovered = (KL_zero - KL_sae) / KL_zero
with KL(p_clean || p) averaged over predicted tokens. Written to RUN/train/<name>/eval.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt

from activations import layout
from activations.atomic import atomic_write_json, existing_dir
from activations.config import option as _f
from activations.errors import StrataError
from activations.lock import run_lock
from activations.reader import ActivationReader, open_run
from sae import train_folder
from sae.checkpoint import load_saes
from sae.metrics import LatentStats, ReconStats
from sae.models import use_precision
from sae.modes import Unit, check_exclude_first, split_seed


@dataclass
class EvalConfig:
    run_dir: str = _f("runs/default", "harvest run directory", cli=False)
    name: str = _f("", "training run to evaluate (default: the only one in RUN/train)")
    max_tokens: Annotated[int, Ge(0)] = _f(0, "held-out tokens for the reconstruction metrics (0 = all)")
    batch_size: Annotated[int, Gt(0)] = _f(4096, "tokens per batch")
    ce_contexts: Annotated[int, Ge(0)] = _f(16, "held-out contexts for CE/KL loss recovered (0 = skip the model forward)")
    device: str = _f("auto", "auto, cpu, cuda")
    exclude_first: Annotated[int, Ge(-1)] = _f(-1, "leave out the first N tokens of every context "
                                                   "(-1 = as the SAEs were trained)")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto", "dtype of the SAE encoder matmul and the model forward: auto (bf16 where a one-off probe finds it "
                ">= 1.5x faster than fp32 on this machine), fp32, bf16")


def _resolve_name(cfg: EvalConfig) -> str:
    if cfg.name:
        return layout.check_name(cfg.name)
    root = layout.train_root(cfg.run_dir)
    names = sorted(p.name for p in root.iterdir() if existing_dir(p / "checkpoint") is not None) if root.is_dir() else []
    if len(names) != 1:
        raise StrataError(f"pick a training run with --name (found: {', '.join(names) or 'none'})")
    return names[0]


@torch.no_grad()
def reconstruction_metrics(run, saes: dict, heldout: list[int], cfg: EvalConfig, device) -> dict:
    units = [Unit(sid, sae) for sid, sae in saes.items()]
    keys = sorted({k for u in units for k in u.needed_keys})
    reader = ActivationReader(run, keys, cfg.batch_size, shards=heldout, shuffle=False,
                              exclude_first=cfg.exclude_first)
    recon = {u.sae_id: {} for u in units}
    lat = {u.sae_id: LatentStats(u.sae.cfg.n_latents) for u in units}
    seen = 0
    for batch in reader:
        acts = {k: v.to(device) for k, v in batch.acts.items()}
        for u in units:
            x, y = u.io(acts)
            f = u.sae.encode_n(x)
            r = u.sae.decode_n(f) + u.sae.skip_out(x)
            lat[u.sae_id].update_dense(f)
            scale = dict(zip(u.out_keys, u.sae.cfg.out_scales))
            for key, (yk, rk) in u.parts(y, r).items():  # back to raw units, per key
                recon[u.sae_id].setdefault(key, ReconStats()).update(yk / scale[key], rk / scale[key])
        seen += batch.rows.numel()
        if cfg.max_tokens and seen >= cfg.max_tokens:
            break
    out = {}
    for u in units:
        per_key = {k: s.summary() for k, s in recon[u.sae_id].items()}
        summary = {m: float(np.mean([v[m] for v in per_key.values()])) for m in next(iter(per_key.values()))}
        summary.update(lat[u.sae_id].summary())
        out[u.sae_id] = {"overall": summary, "per_key": per_key, "tokens": seen,
                         "log10_density": torch.log10(lat[u.sae_id].density() + 1e-10).tolist()}
    return out


def _contexts(run, heldout: list[int], n: int) -> torch.Tensor:
    T = run.manifest.context_length
    ids = []
    for s in heldout:
        rec = run.manifest.shards[s]
        toks = run.read_tokens(rec.token_start, rec.token_start + rec.rows)["token_ids"]
        usable = len(toks) // T * T
        ids.append(toks[:usable].reshape(-1, T))
    ids = np.concatenate(ids)[:n]
    return torch.from_numpy(ids.astype(np.int64))


def _ce_kl(logits: torch.Tensor, ids: torch.Tensor, clean_logp: torch.Tensor) -> tuple[float, float]:
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    ce = F.nll_loss(logp.reshape(-1, logp.shape[-1]), ids[:, 1:].reshape(-1))
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1).mean()
    return float(ce), float(kl)


@torch.no_grad()
def downstream_metrics(run, saes: dict, heldout: list[int], cfg: EvalConfig, device,
                       dtype: torch.dtype = torch.float32) -> dict:
    from activations.hooks import capture, splice
    from activations.model import load_model

    lm = load_model(run.manifest.model["id"], device, dtype)
    model = lm.model
    ids = _contexts(run, heldout, cfg.ce_contexts).to(device)
    if ids.numel() == 0:
        return {}
    clean = model(ids).logits
    clean_logp = F.log_softmax(clean[:, :-1].float(), -1)
    ce_clean, _ = _ce_kl(clean, ids, clean_logp)
    first = max(0, cfg.exclude_first)

    def keep_first(a, new):
        """Positions the SAEs were not trained on (exclude_first) keep their clean activation, in both the
        SAE and the zero-ablation pass, so loss recovered compares like with like."""
        if first:
            new = new.clone()
            new[:, :first] = a[:, :first]
        return new

    out = {}
    for sid, sae in saes.items():
        c = sae.cfg
        cross = None
        if c.mode == "crosscoder":
            acts = capture(model, c.in_keys, ids)
            flat = torch.cat([acts[k].reshape(-1, acts[k].shape[-1]) for k in c.in_keys], 1)
            cross = dict(zip(c.in_keys, sae.reconstruct(flat.float()).chunk(len(c.in_keys), 1)))
        per_key = {}
        for key in c.out_keys:
            stash: dict = {}

            def replace(a, key=key, c=c, sae=sae, cross=cross, stash=stash):
                if cross is not None:
                    new = cross[key].reshape(a.shape).to(a.dtype)
                else:
                    src = stash["x"] if c.mode == "transcoder" else a
                    kw = {"key": key} if c.mode == "multilayer" else {}
                    new = sae.reconstruct(src.reshape(-1, src.shape[-1]).float(), **kw).reshape(a.shape).to(a.dtype)
                return keep_first(a, new)

            with contextlib.ExitStack() as stack:
                if c.mode == "transcoder":
                    stack.enter_context(splice(model, c.in_keys[0], lambda a, stash=stash: stash.__setitem__("x", a) or a))
                stack.enter_context(splice(model, key, replace))
                ce_sae, kl_sae = _ce_kl(model(ids).logits, ids, clean_logp)
            with splice(model, key, lambda a: keep_first(a, torch.zeros_like(a))):
                ce_zero, kl_zero = _ce_kl(model(ids).logits, ids, clean_logp)
            denom = ce_zero - ce_clean
            per_key[key] = {"ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero, "kl_sae": kl_sae,
                            "kl_zero": kl_zero,
                            "ce_loss_recovered": (ce_zero - ce_sae) / denom if abs(denom) > 1e-9 else float("nan"),
                            "kl_recovered": (kl_zero - kl_sae) / kl_zero if kl_zero > 1e-12 else float("nan")}
        out[sid] = per_key
    return out


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate train/<name> and write its eval.json, holding the run's "train-<name>" lock throughout (no
    training of that name can replace the checkpoint underneath)."""
    name = _resolve_name(cfg)
    run = open_run(cfg.run_dir)
    with run_lock(cfg.run_dir, f"strata eval --name {name}", scope=f"train-{name}"):
        return _evaluate(cfg, run, name)


def _evaluate(cfg: EvalConfig, run, name: str) -> dict:
    from activations.model import resolve_device

    tdir = layout.train_dir(cfg.run_dir, name)
    saved = train_folder.read_config(tdir)
    identity = saved["identity"] if saved is not None else {}
    if cfg.exclude_first < 0:  # evaluate on the positions the SAEs were trained on
        cfg = dataclasses.replace(cfg, exclude_first=int(identity.get("exclude_first", 0)))
        check_exclude_first(cfg.exclude_first, run.manifest.context_length, f"exclude_first in {tdir / 'config.json'}:")
    else:
        check_exclude_first(cfg.exclude_first, run.manifest.context_length)
    device = resolve_device(cfg.device)
    saes = load_saes(cfg.run_dir, name, device)
    prec = use_precision(saes, cfg.precision, cfg.batch_size, device)
    print(prec.line())
    _, heldout = run.split(identity.get("heldout_fraction", 0.1))
    if not heldout:
        raise StrataError(f"{cfg.run_dir} has no held-out shard (it needs at least two shards); harvest more tokens")
    result = {"name": name, "heldout_shards": heldout, "precision": prec.record(),
              "saes": reconstruction_metrics(run, saes, heldout, cfg, device)}
    if cfg.ce_contexts > 0:
        for sid, per_key in downstream_metrics(run, saes, heldout, cfg, device, prec.dtype).items():
            result["saes"][sid]["downstream"] = per_key
            for key, m in per_key.items():
                result["saes"][sid]["per_key"].setdefault(key, {}).update(m)
            result["saes"][sid]["overall"]["ce_loss_recovered"] = float(np.mean([m["ce_loss_recovered"] for m in per_key.values()]))
            result["saes"][sid]["overall"]["kl_recovered"] = float(np.mean([m["kl_recovered"] for m in per_key.values()]))
    groups = seed_groups(result["saes"])
    if groups:
        result["seed_groups"] = groups
    try:
        atomic_write_json(tdir / "eval.json", _finite(result))
    except OSError as e:
        raise StrataError(f"cannot write {tdir / 'eval.json'} ({e.strerror or e}); make {tdir} writable and rerun") from None
    return result


def _finite(obj):
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _mean_std(values: list) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the finite values."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def seed_groups(saes: dict) -> dict:
    """SAEs trained with `--seeds` (ids <id>.s<seed>), grouped by <id>: {id: {"seeds", "sae_ids", "overall":
    {metric: {mean, std, n}}, "per_key": {key: {metric: {mean, std, n}}}}} over the group's members."""
    members: dict[str, list[tuple[int, str]]] = {}
    for sid in saes:
        base, seed = split_seed(sid)
        if seed is not None:
            members.setdefault(base, []).append((seed, sid))
    out = {}
    for base, group in members.items():
        ids = [sid for _, sid in sorted(group)]
        rs = [saes[sid] for sid in ids]

        def stats(dicts: list[dict]) -> dict:
            names = [m for m, v in dicts[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            return {m: _mean_std([d.get(m) for d in dicts]) for m in names}

        out[base] = {"seeds": sorted(seed for seed, _ in group), "sae_ids": ids,
                     "overall": stats([r["overall"] for r in rs]),
                     "per_key": {key: stats([r["per_key"].get(key, {}) for r in rs]) for key in rs[0]["per_key"]}}
    return out


def format_report(result: dict) -> str:
    lines = [f"eval of {result['name']} on held-out shards {result['heldout_shards']}"]
    for sid, r in result["saes"].items():
        o = r["overall"]
        extra = f"  CE recovered {o['ce_loss_recovered']:.3f}  KL recovered {o['kl_recovered']:.3f}" if "ce_loss_recovered" in o else ""
        lines.append(f"{sid:>16}: FVU {o['fvu']:.4f}  L0 {o['l0']:.1f}  cos {o['cosine']:.3f}  shrinkage {o['shrinkage']:.3f}"
                     f"  alive {o['frac_alive']:.3f}{extra}")
        if len(r["per_key"]) > 1:
            for key, m in r["per_key"].items():
                ce = f"  CE recovered {m['ce_loss_recovered']:.3f}" if "ce_loss_recovered" in m else ""
                lines.append(f"{'':>18}{key}: FVU {m['fvu']:.4f}{ce}")
    groups = result.get("seed_groups") or {}
    if groups:
        lines.append("across seeds (mean ± std):")
    for base, g in groups.items():
        o = g["overall"]
        shown = [("FVU", "fvu", 4), ("L0", "l0", 1), ("cos", "cosine", 3), ("shrinkage", "shrinkage", 3),
                 ("alive", "frac_alive", 3), ("CE recovered", "ce_loss_recovered", 3), ("KL recovered", "kl_recovered", 3)]
        cells = [f"{label} {o[m]['mean']:.{p}f} ± {o[m]['std']:.{p}f}" for label, m, p in shown
                 if o.get(m, {}).get("mean") is not None]
        seeds = ",".join(str(s) for s in g["seeds"])
        lines.append(f"{base:>16}: seeds {seeds}  " + "  ".join(cells))
    return "\n".join(lines)
