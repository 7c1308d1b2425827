"""Sweep configs: a YAML file -> the list of members to train (checked whole before anything is written).

Sweep config (YAML or JSON), read by `python scripts/sweep.py CONFIG.yaml`:

    run: runs/smol                  # harvest run directory (required)
    name: k-lr                      # sweep name (default: the config file's stem) -> RUN/sweeps/<name>/
    parallel: 2                     # members training at once (default 1; --parallel overrides)
    eval: false                     # true, or a mapping of `strata eval` fields ({ce_contexts: 8}): eval each member
    base: {arch: topk, layers: "3", max_tokens: 2000000, wandb_project: my-sweeps}   # TrainConfig fields for all
    grid:                           # cartesian product of any TrainConfig fields (first key varies slowest)
      k: [16, 32, 64]
      lr: [1.0e-4, 3.0e-4]
    random:                         # ... or, instead of grid, n samples drawn with a seed
      n: 8
      seed: 0
      space: {k: [16, 32, 64], lr: {log_uniform: [1.0e-5, 1.0e-3]}, expansion: {choice: [4, 8]}}
                                    # a list or {choice: [...]}; {uniform: [lo, hi]}; {log_uniform: [lo, hi]}
                                    # (int fields are rounded)

Member i is named <sweep>-<i>. A rerun must describe the same members as RUN/sweeps/<sweep>/sweep.json.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from annotated_types import Ge, Gt

from activations import layout
from activations.config import option as _f
from sae.evaluate import EvalConfig
from sae.train_config import TrainConfig
from strata.config import (
    ConfigError,
    base_type,
    check_value,
    load_config_file,
    validate_config,
)

TOP_KEYS = ("run", "name", "parallel", "eval", "base", "grid", "random")
SET_BY_SWEEP = ("run_dir", "name", "resume", "overwrite", "progress")  # the sweep decides these per member


@dataclass
class Member:
    name: str
    params: dict                     # the swept fields of this member
    config: TrainConfig              # base + params
    status: str = "pending"
    error: str = ""
    command: str = ""
    seconds: float | None = None

    def record(self) -> dict:
        return {"name": self.name, "params": self.params, "status": self.status, "error": self.error,
                "command": self.command, "seconds": self.seconds}


@dataclass
class Sweep:
    name: str
    run: str
    parallel: int
    eval: dict | None                # EvalConfig fields, or None for no eval
    base: dict
    search: dict                     # {"grid": {...}} or {"random": {...}} as given
    members: list = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return layout.sweep_dir(self.run, self.name)

    def record(self) -> dict:
        return {"sweep": self.name, "run": self.run, "parallel": self.parallel, "eval": self.eval, "base": self.base,
                **self.search, "members": [m.record() for m in self.members]}


@dataclass
class RandomSearch:
    n: Annotated[int, Gt(0)] = field(metadata={"help": "members to draw"})
    seed: Annotated[int, Ge(0)] = _f(0, "seed of the draws (the same seed draws the same members)")
    space: dict | None = field(default=None, metadata={
        "help": "TrainConfig field -> list, {choice: [...]}, {uniform: [lo, hi]} or {log_uniform: [lo, hi]}"})


# ---------------------------------------------------------------- config -> members (nothing is written here)
def _check_fields(names, where: str) -> None:
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    for n in names:
        if n in SET_BY_SWEEP:
            raise ConfigError(f"{where}: {n} is set by the sweep for each member; remove it (the run goes in `run:`)")
        if n not in fields:
            raise ConfigError(f"{where}: unknown TrainConfig field {n!r}; valid fields: "
                              f"{', '.join(f for f in fields if f not in SET_BY_SWEEP)}")


def grid_params(grid) -> list[dict]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("grid: must map TrainConfig fields to lists of values, e.g. grid: {k: [16, 32]}")
    _check_fields(grid, "grid")
    axes = {}
    for name, values in grid.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"grid: {name} has no values; give at least one or remove it")
        axes[name] = [check_value(TrainConfig, name, v, "grid") for v in values]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _sampler(name: str, spec):
    """A function rng -> value for one entry of random.space."""
    if isinstance(spec, list):
        spec = {"choice": spec}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"random.space: {name} must be a list, {{choice: [...]}}, {{uniform: [lo, hi]}} or {{log_uniform: [lo, hi]}}")
    (kind, arg), = spec.items()
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"random.space: {name} has no values to choose from; give a non-empty list")
        values = [check_value(TrainConfig, name, v, "random.space") for v in arg]
        return lambda rng: rng.choice(values)
    if kind not in ("uniform", "log_uniform"):
        raise ConfigError(f"random.space: {name}: unknown distribution {kind!r}; use choice, uniform or log_uniform")
    numeric = base_type(TrainConfig, name)
    if numeric not in (int, float):
        raise ConfigError(f"random.space: {name} is not numeric; give it a list of values instead of {kind}")
    try:
        lo, hi = (float(v) for v in arg)
    except (TypeError, ValueError):
        raise ConfigError(f"random.space: {name}: {kind} needs [lo, hi] numbers, got {arg!r}") from None
    if not lo <= hi or (kind == "log_uniform" and lo <= 0):
        raise ConfigError(f"random.space: {name}: {kind} needs lo <= hi{' and lo > 0' if kind == 'log_uniform' else ''}")
    draw = (lambda rng: rng.uniform(lo, hi)) if kind == "uniform" else (
        lambda rng: math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return lambda rng: check_value(TrainConfig, name, round(draw(rng)) if numeric is int else draw(rng), "random.space")


def random_params(spec) -> list[dict]:
    if not isinstance(spec, dict):
        raise ConfigError("random: must be a mapping with n, seed and space, e.g. random: {n: 8, seed: 0, space: {k: [16, 32]}}")
    search = validate_config(RandomSearch, spec, {k: f"random.{k}" for k in spec}, where="random")
    if not isinstance(search.space, dict) or not search.space:
        raise ConfigError("random.space must map TrainConfig fields to value lists or ranges; it is empty")
    _check_fields(search.space, "random.space")
    samplers = {name: _sampler(name, s) for name, s in search.space.items()}
    rng = random.Random(search.seed)
    return [{name: draw(rng) for name, draw in samplers.items()} for _ in range(search.n)]


def _eval_options(value) -> dict | None:
    if value in (None, False):
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("eval: must be true, false or a mapping of `strata eval` fields, e.g. {ce_contexts: 8}")
    allowed = [f.name for f in dataclasses.fields(EvalConfig) if f.name not in ("run_dir", "name")]
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ConfigError(f"eval: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(allowed)}")
    return {k: check_value(EvalConfig, k, v, "eval") for k, v in value.items()}


def load_sweep(path, parallel: int | None = None) -> Sweep:
    """Parse and check a sweep config; every problem is one ConfigError before anything is written."""
    data = load_config_file(path)
    unknown = sorted(str(k) for k in data if k not in TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {', '.join(unknown)}; valid keys: {', '.join(TOP_KEYS)}")
    run = data.get("run")
    if not run or not isinstance(run, str):
        raise ConfigError(f"{path}: missing `run:` (the harvest run directory to train on)")
    if not layout.manifest_path(run).is_file():
        raise ConfigError(f"run {run} has no {layout.MANIFEST}; harvest it first (strata harvest {run})")
    name = str(data.get("name") or Path(path).stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"sweep name {name!r} must be letters, digits, '_', '.' or '-'; set `name:`")
    parallel = parallel if parallel is not None else data.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise ConfigError(f"parallel must be a positive integer (got {parallel!r})")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError("base: must map TrainConfig fields to values, e.g. base: {arch: topk, layers: '3'}")
    _check_fields(base, "base")
    base = {k: check_value(TrainConfig, k, v, "base") for k, v in base.items()}
    if ("grid" in data) == ("random" in data):
        raise ConfigError("give exactly one of `grid:` (cartesian product) or `random:` (n samples)")
    if "grid" in data:
        params, search = grid_params(data["grid"]), {"grid": data["grid"]}
    else:
        params, search = random_params(data["random"]), {"random": data["random"]}
    sweep = Sweep(name, run, parallel, _eval_options(data.get("eval")), base, search)
    search_key = next(iter(search))
    for i, p in enumerate(params):
        member = f"{name}-{i}"
        origins = {**{k: "base" for k in base}, **{k: search_key for k in p}}
        cfg = validate_config(TrainConfig, {**base, **p, "run_dir": run, "name": member}, origins)
        sweep.members.append(Member(member, p, cfg))
    _check_previous(sweep)
    return sweep


def _check_previous(sweep: Sweep) -> None:
    """A rerun must describe the same members: indices name train directories, so a changed grid would mix them."""
    path = sweep.dir / "sweep.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for m, before in zip(sweep.members, old["members"]):  # keep what earlier runs recorded
            m.status, m.error, m.command, m.seconds = (before.get(k, m.record()[k]) for k in ("status", "error", "command", "seconds"))
        if [(m["name"], m["params"]) for m in old["members"]] != [(m.name, jsonable(m.params)) for m in sweep.members] \
                or _identity(old.get("base", {})) != _identity(jsonable(sweep.base)):
            raise ConfigError(f"sweep {sweep.name} already exists in {sweep.dir} with other members; "
                              f"give this config a new `name:` or delete that folder")
    for m in sweep.members:
        cfg_path = layout.train_dir(sweep.run, m.name) / "config.json"
        if cfg_path.is_file() and not path.is_file():
            raise ConfigError(f"{layout.train_dir(sweep.run, m.name)} exists but is not part of sweep {sweep.name}; "
                              f"give the sweep a new `name:` or delete that training run")


def _identity(base: dict) -> dict:
    """The base fields that change what a member learns (not wandb, logging, device...)."""
    keep = TrainConfig().identity()
    return {k: v for k, v in base.items() if k in keep}


def jsonable(obj):
    return json.loads(json.dumps(obj))
