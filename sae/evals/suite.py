"""The suites `strata eval --suite` can run, and what a suite is given.

A suite is looked up by name and imported only when asked for (some need scikit-learn or a model). It gets a
SuiteContext: the opened run, the loaded SAEs (compute precision already set), the held-out shards, the training
identity (exclude_first, heldout_fraction, ...). It returns its metrics per SAE (see sae/evals/__init__.py); it
raises StrataError for a problem the user can fix, which fails that suite alone: the others still run and
their results are written. A suite module may also define `check(cfg, run)`, run for every requested suite before
any of them: what it refuses stops the command before anything is written.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from activations.errors import StrataError

# name -> (module with run(ctx), what it measures)
SUITES: dict[str, tuple[str, str]] = {
    "core": ("sae.evals.core", "reconstruction (FVU, cosine, shrinkage), sparsity (L0, dead/dense), CE/KL loss recovered"),
    "truth": ("sae.evals.truth", "synthetic runs (strata synth): MMCS/F1 of recovered features, layer profiles, matches"),
}


@dataclass(frozen=True)
class SuiteContext:
    cfg: object                 # sae.evaluate.EvalConfig, exclude_first resolved to what the SAEs were trained on
    run: object                 # activations.reader.Run, opened
    name: str                   # training run name (RUN/train/<name>)
    train_dir: Path
    saes: dict                  # sae_id -> SAE, on `device`, compute dtype set by use_precision
    identity: dict              # the training config's identity (exclude_first, heldout_fraction, seed, ...)
    heldout: list[int]          # held-out shard indices
    device: torch.device
    dtype: torch.dtype          # the precision chosen for model forwards (fp32 or bf16)


def parse_suites(spec: str) -> list[str]:
    """"core,absorption" -> ["core", "absorption"] in the order given, each once; StrataError on an unknown name."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise StrataError(f"--suite is empty; pick one or more of: {', '.join(SUITES)}")
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise StrataError(f"unknown eval suite {', '.join(map(repr, unknown))}; pick from: {', '.join(SUITES)}")
    return list(dict.fromkeys(names))


def check_suites(names: list[str], cfg, run) -> None:
    """Before any suite runs: each suite module's optional `check(cfg, run)` raises StrataError for input it cannot
    use (a bad task file, explainer flags, a run without a model), so a command that cannot run writes nothing."""
    for name in names:
        check = getattr(importlib.import_module(SUITES[name][0]), "check", None)
        if check is not None:
            check(cfg, run)


def run_suite(name: str, ctx: SuiteContext) -> dict:
    return importlib.import_module(SUITES[name][0]).run(ctx)


def describe() -> str:
    return "; ".join(f"{n}: {d}" for n, (_, d) in SUITES.items())
