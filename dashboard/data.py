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


def within(run, path) -> bool:
    """Whether `path` resolves inside the run directory (see `inside`)."""
    try:
        inside(run, path)
        return True
    except StrataError:
        return False


def train_names(run) -> list[str]:
    """Training runs on disk (a symlink that leads out of the run, or a folder whose name Strata would never
    give a training run, is not one)."""
    root = inside(run, layout.train_root(run))
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.endswith((".partial", ".old"))
                  and layout.valid_name(p.name) and within(run, p))


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
    """Each SAE's summary from the eval.json `strata eval` writes (sae/evaluate.py): {sae_id: overall}, where
    overall holds fvu, l0, frac_dead, ... and ce_loss_recovered when eval ran the model. {} when there is no
    readable file."""
    path = inside(run, layout.train_dir(run, name) / "eval.json")
    if not path.is_file():
        return {}
    try:
        saes = json.loads(path.read_text()).get("saes")
    except (json.JSONDecodeError, AttributeError):
        return {}
    if not isinstance(saes, dict):
        return {}
    return {str(sid): r["overall"] for sid, r in saes.items() if isinstance(r, dict) and isinstance(r.get("overall"), dict)}


def train_config(run, name: str) -> dict:
    path = inside(run, layout.train_dir(run, name) / "config.json")
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


# the overview's columns: (key in eval.json's per-SAE "overall", factor); sae/evaluate.py writes these keys
# (NaN is stored as null), "frac_dead" as a fraction of latents. The core columns are always shown; the other
# suites' (sae/evals/) only when some SAE of the training run has them.
EVAL_COLUMNS = {"L0": ("l0", 1.0), "FVU": ("fvu", 1.0), "dead %": ("frac_dead", 100.0),
                "loss recovered": ("ce_loss_recovered", 1.0),
                "absorption": ("absorption_mean", 1.0), "full absorption": ("absorption_full", 1.0),
                "probe k=1": ("probing_k1_accuracy", 1.0), "probe k=5": ("probing_k5_accuracy", 1.0),
                "probe k=20": ("probing_k20_accuracy", 1.0), "probe raw": ("probing_full_accuracy", 1.0),
                "detection": ("autointerp_detection_mean", 1.0), "fuzzing": ("autointerp_fuzzing_mean", 1.0)}
CORE_COLUMNS = ("L0", "FVU", "dead %", "loss recovered")


def eval_metric(overall: dict, column: str) -> float | None:
    """One of EVAL_COLUMNS from an SAE's eval summary; None when eval did not measure it."""
    key, factor = EVAL_COLUMNS[column]
    v = overall.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return factor * float(v)
    return None


def eval_per_key(run, name: str) -> list[dict]:
    """One row per SAE and key of its eval.json `per_key` (a multi-layer SAE: each layer of its input): the
    overview's per-layer table, every numeric metric as a column."""
    path = inside(run, layout.train_dir(run, name) / "eval.json")
    try:
        saes = json.loads(path.read_text()).get("saes") if path.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        saes = None
    rows = []
    for sid, r in (saes or {}).items():
        per_key = r.get("per_key") if isinstance(r, dict) else None
        for key, metrics in (per_key or {}).items():
            if isinstance(metrics, dict):
                rows.append({"SAE": str(sid), "key": str(key), **{m: eval_number(v) for m, v in metrics.items()}})
    return rows


def eval_number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def numeric_metrics(overalls: list[dict]) -> list[str]:
    """Every metric name with a finite number in some SAE's eval summary, sorted: the frontier's axis choices."""
    return sorted({m for o in overalls for m, v in o.items() if eval_number(v) is not None})


def sweep_points(run, x: str = "l0", y: str = "fvu") -> list[dict]:
    """(x, y) of every evaluated SAE of every training run, two eval.json metrics (default L0 and FVU): the points
    of the frontier of evaluated SAEs."""
    points = []
    for name in train_names(run):
        for sid, res in eval_results(run, name).items():
            vx, vy = eval_number(res.get(x)), eval_number(res.get(y))
            if vx is not None and vy is not None:
                points.append({"train": name, "sae": sid, "x": vx, "y": vy})
    return points


def pareto_front(points: list[dict], maximize_y: bool = False) -> list[dict]:
    """Points no other point beats on both x (lower) and y (lower, or higher with maximize_y), sorted by x."""
    sign = -1.0 if maximize_y else 1.0
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p["x"], sign * p["y"])):
        if sign * p["y"] < best:
            front.append(p)
            best = sign * p["y"]
    return front


def sweep_summaries(run) -> dict[str, list[dict]]:
    """{sweep name: members} from RUN/sweeps/<sweep>/summary.json (written by `python scripts/sweep.py`;
    schema in strata/sweep_report.py): each member's name, params, status, l0, fvu, loss_recovered, dead_fraction, frontier."""
    root = inside(run, layout.sweeps_root(run))
    out = {}
    if not root.is_dir():
        return out
    for folder in sorted(root.iterdir()):
        path = folder / "summary.json"
        if not (folder.is_dir() and within(run, path) and path.is_file()):
            continue
        try:
            members = json.loads(path.read_text()).get("members", [])
        except (json.JSONDecodeError, AttributeError):
            continue
        out[folder.name] = [m for m in members if isinstance(m, dict)]
    return out


# ---------------------------------------------------------------- attribution graphs (RUN/graphs/<train>/<graph>.json)
GRAPH_SCHEMA = "strata-graph/1"


def graph_names(run) -> list[tuple[str, str]]:
    """(train name, graph name) of every graph file on disk, sorted (names Strata would not give are skipped)."""
    root = inside(run, layout.graphs_root(run))
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and layout.valid_name(p.name) and within(run, p)):
        for f in sorted(folder.glob("*.json")):
            if layout.valid_name(f.stem) and within(run, f):
                out.append((folder.name, f.stem))
    return out


def read_graph(run, train: str, graph: str) -> dict:
    """A graph file (schema strata-graph/1: metadata, nodes, links, qParams; see README), checked for the fields
    the Circuits page reads; qParams gets its defaults when missing."""
    path = inside(run, layout.graph_path(run, train, graph))
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise StrataError(f"no graph {graph!r} for training run {train!r} ({path}); make one with `strata graph`") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StrataError(f"{path} is not a readable graph file ({str(e)[:80]}); make it again with `strata graph`") from None
    ok = (isinstance(doc, dict) and isinstance(doc.get("metadata"), dict)
          and doc["metadata"].get("schema") == GRAPH_SCHEMA and isinstance(doc.get("nodes"), list)
          and isinstance(doc.get("links"), list)
          and all(isinstance(n, dict) and {"node_id", "feature_type", "layer", "ctx_idx"} <= set(n) for n in doc["nodes"]))
    if not ok:
        raise StrataError(f"{path} is not a {GRAPH_SCHEMA} graph; make it again with `strata graph`")
    q = doc.get("qParams") if isinstance(doc.get("qParams"), dict) else {}
    doc["qParams"] = {"pinnedIds": list(q.get("pinnedIds") or []), "supernodes": list(q.get("supernodes") or []),
                      "linkType": q.get("linkType", "both"), **{k: v for k, v in q.items()
                                                                 if k not in ("pinnedIds", "supernodes", "linkType")}}
    return doc
