"""Every path inside a run directory is built here and nowhere else (the layout is documented in README.md)."""
from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"


def manifest_path(run) -> Path:
    return Path(run) / MANIFEST


def part_manifest_path(run, rank: int) -> Path:
    """Per-process manifest of a `torchrun` harvest; merged into manifest.json by rank 0 at the end."""
    return Path(run) / "parts" / f"rank-{rank:05d}.json"


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


def acts_dir(run, key: str) -> Path:
    return Path(run) / "acts" / key


def acts_shard_path(run, key: str, i: int) -> Path:
    return acts_dir(run, key) / f"shard-{i:05d}.h5"


def train_root(run) -> Path:
    return Path(run) / "train"


def train_dir(run, name: str) -> Path:
    return train_root(run) / name


def checkpoint_dir(run, name: str) -> Path:
    return train_dir(run, name) / "checkpoint"


def metrics_path(run, name: str) -> Path:
    return train_dir(run, name) / "metrics.jsonl"


def sweep_dir(run, sweep: str) -> Path:
    return Path(run) / "sweeps" / sweep


def index_path(run, name: str) -> Path:
    return Path(run) / "index" / f"{name}.h5"


def share_dir(run) -> Path:
    return Path(run) / "share"


