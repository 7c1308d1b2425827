"""What the dashboard reads, all of it written by earlier stages inside one run directory.

Every path goes through `inside`, which refuses anything that resolves outside the run (names from the URL
such as a training-run name are also checked against what is on disk before they are used).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from activations import layout
from activations.errors import StrataError


def inside(run: Path, path: Path) -> Path:
    """`path` resolved, if it lies inside the run directory; StrataError otherwise."""
    root = Path(run).resolve()
    p = Path(path).resolve()
    if p != root and root not in p.parents:
        raise StrataError(f"{path} is outside the run directory {root}; the dashboard reads only inside it")
    return p


def check_run(run) -> Path:
    run = Path(run)
    if not layout.manifest_path(run).is_file():
        raise StrataError(f"{run} is not a Strata run (no manifest.json); pass a directory made by `strata harvest`")
    return run.resolve()


def manifest(run) -> dict:
    return json.loads(inside(run, layout.manifest_path(run)).read_text())


def _within(run, path) -> bool:
    try:
        inside(run, path)
        return True
    except StrataError:
        return False


def train_names(run) -> list[str]:
    """Training runs on disk (a symlink that leads out of the run is not one)."""
    root = inside(run, layout.train_root(run))
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.endswith((".partial", ".old"))
                  and _within(run, p))


def index_names(run) -> list[str]:
    """Training runs that have a feature index."""
    return [n for n in train_names(run) if inside(run, layout.index_path(run, n)).is_file()]


def checked_name(run, name: str | None, names: list[str]) -> str | None:
    """A training-run name from the URL, accepted only if it is one of `names` (found on disk)."""
    return name if name in names else (names[0] if names else None)


def metrics(run, name: str) -> list[dict]:
    """metrics.jsonl rows (a torn last line from a live run is skipped)."""
    path = inside(run, layout.metrics_path(run, name))
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def eval_results(run, name: str) -> dict:
    """eval.json as {sae_id: {metric: value}} (a flat or nested file; unknown shapes give {})."""
    path = inside(run, layout.train_dir(run, name) / "eval.json")
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    if isinstance(data, dict) and isinstance(data.get("saes"), dict):
        data = data["saes"]
    if isinstance(data, dict):  # `strata eval` nests each SAE's summary under "overall"
        return {str(k): (v["overall"] if isinstance(v.get("overall"), dict) else v)
                for k, v in data.items() if isinstance(v, dict)}
    return {}


def train_config(run, name: str) -> dict:
    path = inside(run, layout.train_dir(run, name) / "config.json")
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


METRIC_ALIASES = {
    "L0": ("l0",),
    "FVU": ("fvu",),
    "dead %": ("dead_pct", "dead_percent", "dead_frac", "dead_fraction", "frac_dead"),
    "loss recovered": ("ce_loss_score", "loss_recovered", "ce_recovered", "ce_loss_recovered"),
}


def pick_metric(results: dict, name: str):
    """One of the overview's metrics from an eval entry, by its usual names (fractions of dead -> percent)."""
    for key in METRIC_ALIASES[name]:
        v = results.get(key)
        if isinstance(v, dict):
            v = v.get("value", v.get("mean"))
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            if name == "dead %" and "frac" in key:
                return 100 * float(v)
            return float(v)
    return None


def sweep_points(run) -> list[dict]:
    """(L0, FVU) of every evaluated SAE of every training run: the points of the sweep frontier."""
    points = []
    for name in train_names(run):
        for sid, res in eval_results(run, name).items():
            l0, fvu = pick_metric(res, "L0"), pick_metric(res, "FVU")
            if l0 is not None and fvu is not None:
                points.append({"train": name, "sae": sid, "L0": l0, "FVU": fvu})
    return points


def pareto_front(points: list[dict]) -> list[dict]:
    """Points no other point beats on both L0 (lower) and FVU (lower), sorted by L0."""
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p["L0"], p["FVU"])):
        if p["FVU"] < best:
            front.append(p)
            best = p["FVU"]
    return front


def sweep_summaries(run) -> dict[str, list[dict]]:
    """{sweep name: members} from RUN/sweeps/<sweep>/summary.json (written by `strata sweep`; schema in
    strata/sweep_report.py): each member's name, params, status, l0, fvu, loss_recovered, dead_fraction, frontier."""
    root = inside(run, layout.sweep_dir(run, ""))  # RUN/sweeps
    out = {}
    if not root.is_dir():
        return out
    for folder in sorted(root.iterdir()):
        path = folder / "summary.json"
        if not (folder.is_dir() and _within(run, path) and path.is_file()):
            continue
        try:
            members = json.loads(path.read_text()).get("members", [])
        except (json.JSONDecodeError, AttributeError):
            continue
        out[folder.name] = [m for m in members if isinstance(m, dict)]
    return out
