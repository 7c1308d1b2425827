"""Every path inside a run directory is built here and nowhere else (the layout is documented in README.md)."""
from __future__ import annotations

import re
from pathlib import Path

from activations.errors import StrataError

MANIFEST = "manifest.json"
LOCK = ".strata.lock"
OWNER_MARKER = ".strata-owned"  # in every folder Strata creates as one output unit (see activations/ownership.py)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def valid_name(name: str) -> bool:
    """Whether `name` may be a run/training/sweep name (see check_name)."""
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and ".." not in name


def check_name(name: str, what: str = "training run name") -> str:
    """A name that becomes one path component inside a run: letters, digits, '_', '-', '.', never '..'.
    Every path built from a user-given name goes through here, so no name can reach outside its folder."""
    if not valid_name(name):
        raise StrataError(f"{what} {name!r} is not allowed: use one path component of letters, digits, '_', '-' "
                          f"and '.' (no '/', no '..', at most 128 characters), e.g. topk-k32")
    return name


def manifest_path(run) -> Path:
    return Path(run) / MANIFEST


def parts_dir(run) -> Path:
    """Per-process manifests of a `torchrun` harvest in progress."""
    return Path(run) / "parts"


def part_manifest_path(run, rank: int) -> Path:
    """Per-process manifest of a `torchrun` harvest; merged into manifest.json by rank 0 at the end."""
    return parts_dir(run) / f"rank-{rank:05d}.json"


def shard_index(path) -> int | None:
    """The shard number in a shard file's name (shard-00012.h5 or its .partial), else None."""
    name = Path(path).name
    if not name.startswith("shard-"):
        return None
    digits = name[6:].split(".")[0]
    return int(digits) if digits.isdigit() else None


def tokens_dir(run) -> Path:
    return Path(run) / "tokens"


def tokens_shard_path(run, i: int) -> Path:
    return tokens_dir(run) / f"shard-{i:05d}.h5"


def acts_root(run) -> Path:
    return Path(run) / "acts"


def acts_dir(run, key: str) -> Path:
    return acts_root(run) / key


def acts_shard_path(run, key: str, i: int) -> Path:
    return acts_dir(run, key) / f"shard-{i:05d}.h5"


def train_root(run) -> Path:
    return Path(run) / "train"


def train_dir(run, name: str) -> Path:
    return train_root(run) / check_name(name)


def checkpoint_dir(run, name: str) -> Path:
    return train_dir(run, name) / "checkpoint"


def metrics_path(run, name: str) -> Path:
    return train_dir(run, name) / "metrics.jsonl"


def sweeps_root(run) -> Path:
    return Path(run) / "sweeps"


def sweep_dir(run, sweep: str) -> Path:
    return sweeps_root(run) / check_name(sweep, "sweep name")


def index_root(run) -> Path:
    return Path(run) / "index"


def index_path(run, name: str) -> Path:
    return index_root(run) / f"{check_name(name)}.h5"


def share_dir(run) -> Path:
    return Path(run) / "share"


def lock_path(run) -> Path:
    """Held exclusively by a harvest, shared by every other writer (activations/lock.py)."""
    return Path(run) / LOCK


def scope_lock_path(run, scope: str) -> Path:
    """Held exclusively by one writer of a part of the run, e.g. scope "train-<name>"."""
    return Path(run) / ".locks" / f"{check_name(scope, 'lock scope')}.lock"


def graphs_root(run) -> Path:
    return Path(run) / "graphs"


def graph_path(run, train: str, graph: str) -> Path:
    """Attribution graph JSON written by `strata graph` (sae/circuits/graph_file.py)."""
    return graphs_root(run) / check_name(train) / f"{check_name(graph, 'graph name')}.json"
