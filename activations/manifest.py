"""manifest.json: the description of a harvest run that every later stage reads. Replaced atomically;
the source of truth for which shards exist (a shard file not listed here is not part of the run)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from activations import layout
from activations.atomic import atomic_write_json
from activations.errors import StrataError

FORMAT_VERSION = 1


@dataclass
class ShardRecord:
    index: int
    rows: int
    token_start: int
    files: dict  # name ("tokens" or a key like "resid.3") -> {"path": relative path, "sha256": hex}
    resume: dict  # corpus position after this shard: {"doc": next document index, "offset": token offset in it}


@dataclass
class Manifest:
    model: dict
    tokenizer: dict
    keys: list[str]
    dims: dict
    dtype: str
    context_length: int
    config: dict
    corpus: dict = field(default_factory=dict)
    shards: list[ShardRecord] = field(default_factory=list)
    norm_stats: dict = field(default_factory=dict)
    n_tokens: int = 0
    complete: bool = False
    versions: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)  # {"precision": "fp32"|"bf16", "reason": ...}: what the model ran in
    format_version: int = FORMAT_VERSION

    @property
    def n_layers(self) -> int:
        return int(self.model["n_layers"])

    @property
    def d_model(self) -> int:
        return int(self.model["d_model"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        d["shards"] = [ShardRecord(**s) for s in d.get("shards", [])]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def add_norm_stats(norm_stats: dict, key: str, count: int, sum_norm: float, sum_sq_norm: float, max_norm: float) -> None:
    """Accumulate activation-norm sums (sums, not means, so resumed and merged runs add up exactly)."""
    ns = norm_stats.setdefault(key, {"count": 0, "sum_norm": 0.0, "sum_sq_norm": 0.0, "max_norm": 0.0})
    ns["count"] += int(count)
    ns["sum_norm"] += float(sum_norm)
    ns["sum_sq_norm"] += float(sum_sq_norm)
    ns["max_norm"] = max(ns["max_norm"], float(max_norm))
    ns["mean_norm"] = ns["sum_norm"] / ns["count"]
    ns["mean_sq_norm"] = ns["sum_sq_norm"] / ns["count"]


def merge_manifests(parts: list[Manifest]) -> Manifest:
    """One manifest from the per-process manifests of a distributed harvest: shards in global order."""
    merged = Manifest.from_dict(parts[0].to_dict())
    merged.shards = sorted((s for p in parts for s in p.shards), key=lambda s: s.index)
    merged.n_tokens = sum(s.rows for s in merged.shards)
    merged.norm_stats = {}
    for p in parts:
        for key, ns in p.norm_stats.items():
            add_norm_stats(merged.norm_stats, key, ns["count"], ns["sum_norm"], ns["sum_sq_norm"], ns["max_norm"])
    return merged


def load_manifest(run, path=None) -> Manifest:
    path = Path(path) if path is not None else layout.manifest_path(run)
    if not path.is_file():
        if layout.acts_root(run).is_dir() or layout.tokens_dir(run).is_dir():
            raise StrataError(f"{run} holds shards but no {layout.MANIFEST}, the only description of them: if it was "
                              f"moved, put it back; otherwise harvest into a new folder")
        raise StrataError(f"{run} is not a harvest run (no {layout.MANIFEST}); create one with `strata harvest {run}`")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise StrataError(f"{path} is unreadable ({e}); restore it or re-harvest with --overwrite") from None


def save_manifest(run, manifest: Manifest, path=None) -> None:
    atomic_write_json(path if path is not None else layout.manifest_path(run), manifest.to_dict())


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def software_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("saestrata", "torch", "transformers", "h5py", "datasets", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def relpath(run, path) -> str:
    return Path(path).relative_to(Path(run)).as_posix()
