"""`strata eval`: trained SAEs on the run's held-out shards, one or more suites (sae/evals/suite.py lists them;
`core` is the default: reconstruction, sparsity, CE/KL loss recovered, sae/evals/core.py).

Results go to RUN/train/<name>/eval.json, written atomically after the suites ran. A suite's metrics sit in each
SAE's `overall` and `per_key` beside the other suites' ("<suite>_<metric>" for suites other than core), and
`suites` records, per suite, its status, seconds, metric names and details. Running one suite keeps the results
of the others from an earlier eval of the same checkpoint on the same shards; a suite that fails (e.g. an
unreachable explainer server) is recorded as failed, the others still run, and the command exits 2 with one
line saying so.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from annotated_types import Ge, Gt

from activations import layout
from activations.atomic import atomic_write_json, existing_dir
from activations.config import option as _f
from activations.errors import StrataError
from activations.lock import run_lock
from activations.reader import open_run
from sae import train_folder
from sae.checkpoint import STATE, load_saes, saes_dir
from sae.evals.suite import SUITES, SuiteContext, check_suites, parse_suites, run_suite
from sae.models import use_precision
from sae.modes import check_exclude_first, split_seed


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
    suite: str = _f("core", "comma-separated eval suites to run: " + ", ".join(SUITES) + " (the earlier results of "
                            "suites not run are kept in eval.json)")
    absorption_words: Annotated[int, Gt(0)] = _f(1500, "absorption: single-token words sampled from the vocabulary")
    absorption_max_k: Annotated[int, Gt(0)] = _f(10, "absorption: most main latents per letter")
    probe_tasks: str = _f("", "probing: a .jsonl file of labelled texts (`text`, `label`; >= 2 classes, >= 20 "
                              "examples each) probed instead of the built-in tasks")
    probe_examples: Annotated[int, Ge(20)] = _f(64, "probing: examples per class of each built-in task")
    probe_tokens: Annotated[int, Gt(1)] = _f(64, "probing: tokens per text (longer texts are cut)")
    autointerp_features: Annotated[int, Gt(0)] = _f(50, "autointerp: features sampled per SAE")
    autointerp_tokens: Annotated[int, Ge(0)] = _f(100_000, "autointerp: held-out tokens searched for examples "
                                                           "(0 = all)")
    explainer: Literal["tokens", "openai", "transformers"] = _f(
        "tokens", "autointerp: tokens (offline), openai (any OpenAI-compatible server), transformers (a local model)")
    explainer_model: str = _f("", "autointerp: model for the openai/transformers explainers")
    explainer_url: str = _f("", "autointerp: OpenAI-compatible base URL, e.g. http://localhost:8080/v1")


def _resolve_name(cfg: EvalConfig) -> str:
    if cfg.name:
        return layout.check_name(cfg.name)
    root = layout.train_root(cfg.run_dir)
    names = sorted(p.name for p in root.iterdir() if existing_dir(p / "checkpoint") is not None) if root.is_dir() else []
    if len(names) != 1:
        raise StrataError(f"pick a training run with --name (found: {', '.join(names) or 'none'})")
    return names[0]



@torch.no_grad()
def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate train/<name> and write its eval.json, holding the run's "train-<name>" lock throughout (no
    training of that name can replace the checkpoint underneath)."""
    suites = parse_suites(cfg.suite)
    name = _resolve_name(cfg)
    run = open_run(cfg.run_dir)
    check_suites(suites, cfg, run)
    with run_lock(cfg.run_dir, f"strata eval --name {name}", scope=f"train-{name}"):
        return _evaluate(cfg, run, name, suites)


def _evaluate(cfg: EvalConfig, run, name: str, suites: list[str]) -> dict:
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
    ctx = SuiteContext(cfg=cfg, run=run, name=name, train_dir=tdir, saes=saes, identity=identity, heldout=heldout,
                       device=device, dtype=prec.dtype)
    checkpoint = _checkpoint_id(cfg.run_dir, name)
    result = _earlier(tdir, checkpoint, heldout)
    result.update({"name": name, "heldout_shards": heldout, "precision": prec.record(), "checkpoint": checkpoint})
    failed = []
    for suite in suites:
        t0 = time.perf_counter()
        try:
            out = run_suite(suite, ctx)
        except StrataError as e:
            failed.append(f"{suite} ({e})")
            result["suites"][suite] = {"status": "failed", "error": str(e)}
            continue
        _merge(result, suite, out)
        seconds = time.perf_counter() - t0
        result["suites"][suite].update(status="ok", seconds=round(seconds, 2))
        print(f"eval: {suite} done in {seconds:.1f} s")
    groups = seed_groups(result["saes"])
    result.pop("seed_groups", None)
    if groups:
        result["seed_groups"] = groups
    try:
        atomic_write_json(tdir / "eval.json", _finite(result))
    except OSError as e:
        raise StrataError(f"cannot write {tdir / 'eval.json'} ({e.strerror or e}); make {tdir} writable and rerun") from None
    if failed:
        done = [s for s in suites if result["suites"][s]["status"] == "ok"]
        kept = f"; the results of {', '.join(done)} are in {tdir / 'eval.json'}" if done else ""
        raise StrataError(f"eval suite failed: {'; '.join(failed)}{kept}")
    return result


def _checkpoint_id(run_dir, name: str) -> str:
    """What identifies the evaluated weights: a hash of the checkpoint's state.json (step, tokens seen, RNG)."""
    path = saes_dir(run_dir, name).parent / STATE
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else ""


def _earlier(tdir, checkpoint: str, heldout: list[int]) -> dict:
    """The eval.json of an earlier eval of the same checkpoint on the same shards, whose suites' results are kept;
    else an empty result."""
    try:
        old = json.loads((tdir / "eval.json").read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("checkpoint") == checkpoint and old.get("heldout_shards") == heldout \
            and isinstance(old.get("saes"), dict) and isinstance(old.get("suites"), dict):
        return old
    return {"saes": {}, "suites": {}}


def _merge(result: dict, suite: str, out: dict) -> None:
    """Put a suite's per-SAE results into eval.json's, replacing what the same suite wrote before."""
    previous = result["suites"].get(suite, {}).get("metrics", [])
    names = set()
    for sid, r in out["saes"].items():
        dst = result["saes"].setdefault(sid, {})
        dst.setdefault("overall", {})
        dst.setdefault("per_key", {})
        for m in previous:
            dst["overall"].pop(m, None)
            for per in dst["per_key"].values():
                per.pop(m, None)
        dst["overall"].update(r.get("overall", {}))
        names.update(r.get("overall", {}))
        for key, metrics in r.get("per_key", {}).items():
            dst["per_key"].setdefault(key, {}).update(metrics)
            names.update(metrics)
        for extra, v in r.items():  # anything else a suite keeps per SAE (core: tokens, log10_density, downstream)
            if extra not in ("overall", "per_key"):
                dst[extra] = v
    result["suites"][suite] = {"metrics": sorted(names), "details": out.get("details", {})}


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
    """The printed summary: the core metrics per SAE (and per key), then each other suite's overall metrics."""
    lines = [f"eval of {result['name']} on held-out shards {result['heldout_shards']}"]
    other = {s: r.get("metrics", []) for s, r in result.get("suites", {}).items() if s != "core" and r.get("status") == "ok"}
    for sid, r in result["saes"].items():
        o = r["overall"]
        if "fvu" in o:
            extra = f"  CE recovered {o['ce_loss_recovered']:.3f}  KL recovered {o['kl_recovered']:.3f}" \
                if "ce_loss_recovered" in o else ""
            lines.append(f"{sid:>16}: FVU {o['fvu']:.4f}  L0 {o['l0']:.1f}  cos {o['cosine']:.3f}"
                         f"  shrinkage {o['shrinkage']:.3f}  alive {o['frac_alive']:.3f}{extra}")
            if "ce_loss_recovered_all_mlps" in o:
                lines.append(f"{'':>18}every MLP replaced at once (layers {r['all_mlps']['layers']}): CE recovered "
                             f"{_fmt(o['ce_loss_recovered_all_mlps'])}  KL recovered {_fmt(o['kl_recovered_all_mlps'])}")
            if len(r["per_key"]) > 1:
                for key, m in r["per_key"].items():
                    ce = f"  CE recovered {m['ce_loss_recovered']:.3f}" if "ce_loss_recovered" in m else ""
                    if "fvu" in m:
                        lines.append(f"{'':>18}{key}: FVU {m['fvu']:.4f}{ce}")
        else:
            lines.append(f"{sid:>16}:")
        for suite, names in other.items():
            shown = [f"{m} {_fmt(o[m])}" for m in names if m in o]
            if shown:
                lines.append(f"{'':>18}{suite}: " + "  ".join(shown))
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
        for suite, names in other.items():
            cells = [f"{m} {o[m]['mean']:.3f} ± {o[m]['std']:.3f}" for m in names if o.get(m, {}).get("mean") is not None]
            if cells:
                lines.append(f"{'':>18}{suite}: " + "  ".join(cells))
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
