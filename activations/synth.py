"""`strata synth RUN`: a synthetic run whose activations are made of known features across depth.

It writes a normal run (manifest.json, tokens/ and acts/<key>/ shards, through the harvester's own writers), so
every trainer, eval and analysis runs on it unchanged, plus the generator's record of the truth:
    RUN/synth/truth.json             {"format", "config": the SynthConfig, "lineage": features (lifetime, origin,
                                     parents, frequency, rotations) and edges (layer, parent, child, kind)}
    RUN/synth/features.safetensors   "layer.<L>": float32 [n_features, d_model], the unit direction of every
                                     feature at resid layer L (zero rows where it is not live)
The features and their events (persist, rotate, split, merge, vanish, appear) are described in
activations/synth_lineage.py. At every token
    resid.L   = sum over features live at L of coefficient x direction_L + noise
    mlp_in.L  = resid.L (the block's input; identical values)
    mlp_out.L = sum over the features whose direction is new at L+1 (appeared, split/merge children, rotated)
                of coefficient x direction_{L+1} + noise: what block L writes
so a transcoder mlp_in.L -> mlp_out.L is scored on those features. The manifest's model id is "synthetic"
(`is_synthetic(manifest.model)`); there is no model, so eval's CE pass, analyze's logit effects and the prompt explorer
skip. Token ids are synthetic: 1 + the id of the strongest firing feature at that token (0: none fires).
Everything is deterministic from --seed: shard i depends only on (seed, i), so `--resume` re-creates missing or
damaged shards byte-identical and continues an interrupted run.

Stable API (used by the truth eval suite and the feature-flow tests):
    SynthConfig, synthesize(cfg) -> Manifest, load_truth(run) -> Truth, is_synthetic(model record)
    Truth.lineage (synth_lineage.Lineage: features, edges, directions, live_ids, changed_ids, links),
    Truth.key_features(key) -> (feature ids [n], unit directions [n, d]) of the truth in that key's space,
    Truth.key_layer(key) -> the lineage layer of that key's features (mlp_out.L: L+1),
    Truth.config (the SynthConfig as a dict), shard_codes(cfg, lineage, shard, rows) -> the coefficients
    [rows, n_features] behind shard `shard` (0 where a feature does not fire)
Scoring against the truth (MMCS, F1, lineage links) lives in sae/evals/truth_scores.py.
"""
from __future__ import annotations

import contextlib
import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from annotated_types import Ge, Gt, Le

from activations import layout
from activations.atomic import atomic_path, staged_dir
from activations.config import option
from activations.errors import StrataError
from activations.harvest_dir import check_same_identity, check_target, clear_harvest
from activations.lock import run_lock
from activations.manifest import (
    Manifest,
    ShardRecord,
    add_norm_stats,
    file_sha256,
    load_manifest,
    relpath,
    save_manifest,
    software_versions,
)
from activations.shards import ActivationShardWriter, to_storage, write_tokens
from activations.synth_lineage import Lineage, build_lineage, sample_codes

SYNTHETIC_MODEL_ID = "synthetic"
SYNTH_SITES = ("resid", "mlp_in", "mlp_out")
FORMAT = 1


@dataclass
class SynthConfig:
    run_dir: str = option("runs/synth", "run directory to write")
    layers: Annotated[int, Gt(0), Le(256)] = option(8, "blocks: resid.0 .. resid.<layers> are written")
    d_model: Annotated[int, Gt(1)] = option(64, "width of every activation vector")
    features: Annotated[int, Gt(0)] = option(256, "features live at resid.0 (the roots of the lineage)")
    active: Annotated[float, Gt(0)] = option(6.0, "mean number of root features firing per token")
    freq_exponent: Annotated[float, Ge(0)] = option(0.5, "power law of feature frequencies: p_i ~ (i+1)^-exponent")
    max_freq: Annotated[float, Gt(0), Le(1)] = option(0.2, "cap on any one feature's firing frequency")
    rotate: Annotated[float, Ge(0), Le(1)] = option(0.05, "fraction of live features rotated per layer")
    split: Annotated[float, Ge(0), Le(1)] = option(0.03, "fraction of live features that split in two per layer")
    merge: Annotated[float, Ge(0), Le(1)] = option(0.03, "fraction of live features merged pairwise per layer")
    vanish: Annotated[float, Ge(0), Le(1)] = option(0.03, "fraction of live features that vanish per layer")
    appear: Annotated[float, Ge(0), Le(1)] = option(0.03, "new features per layer, as a fraction of the live ones")
    drift: Annotated[float, Ge(0), Le(1)] = option(0.05, "per-layer drift of a persisting direction (cosine 1-drift^2/2)")
    rotate_cos: Annotated[float, Ge(-1), Le(1)] = option(0.5, "cosine between a rotated direction and the old one")
    child_cos: Annotated[float, Ge(-1), Le(1)] = option(0.7, "cosine between a split child's direction and its parent's")
    noise: Annotated[float, Ge(0)] = option(0.05, "standard deviation of the Gaussian noise per dimension")
    sites: str = option("resid", "comma list of sites to write: resid, mlp_in, mlp_out (mlp_* for transcoders)")
    tokens: Annotated[int, Gt(0)] = option(65536, "tokens to generate")
    context: Annotated[int, Gt(1)] = option(64, "tokens per context")
    shard_tokens: Annotated[int, Gt(0)] = option(8192, "tokens per shard (rounded to whole contexts)")
    dtype: Literal["float16", "bfloat16"] = option("float16", "storage dtype")
    seed: int = option(0, "random seed: the same seed and flags give byte-identical files")
    resume: bool = option(False, "continue an interrupted synth, re-creating missing or damaged shards")
    overwrite: bool = option(False, "replace an existing run in run_dir (refused while trainings/indexes use it)")

    def identity(self) -> dict:
        """What defines the run's content (a resume must match it); `synth` marks the manifest's config."""
        d = asdict(self)
        for k in ("run_dir", "resume", "overwrite"):
            d.pop(k)
        return {"synth": FORMAT, **d}

    def site_list(self) -> list[str]:
        sites = [s.strip() for s in self.sites.split(",") if s.strip()]
        bad = [s for s in sites if s not in SYNTH_SITES]
        if bad or "resid" not in sites:
            raise StrataError(f"--sites {self.sites!r}: synth writes resid and optionally mlp_in, mlp_out; "
                              f"use e.g. --sites resid or --sites resid,mlp_in,mlp_out")
        return sites

    def keys(self) -> list[str]:
        sites = self.site_list()
        out = []
        for L in range(self.layers + 1):
            out.append(f"resid.{L}")
            if L < self.layers:
                out += [f"{s}.{L}" for s in ("mlp_in", "mlp_out") if s in sites]
        return out


@dataclass
class Truth:
    config: dict
    lineage: Lineage

    def key_layer(self, key: str) -> int:
        """The lineage layer whose directions make up activation `key`: L for resid.L and mlp_in.L, L+1 for
        mlp_out.L (what block L writes into resid.L+1)."""
        site, _, layer = key.rpartition(".")
        if site not in SYNTH_SITES or not layer.isdigit():
            raise StrataError(f"a synthetic run has no true features for {key}; it writes {', '.join(SYNTH_SITES)}")
        return int(layer) + (site == "mlp_out")

    def key_features(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(feature ids [n], unit directions [n, d]) of the true features in the space of activation `key`."""
        L = self.key_layer(key)
        ids = self.lineage.changed_ids(L) if key.startswith("mlp_out.") else self.lineage.live_ids(L)
        return ids, self.lineage.directions[L][ids]


def synth_dir(run) -> Path:
    return Path(run) / "synth"


def truth_paths(run) -> tuple[Path, Path]:
    return synth_dir(run) / "truth.json", synth_dir(run) / "features.safetensors"


def is_synthetic(model: dict | None) -> bool:
    """Whether a manifest's model record (`Manifest.model`, or manifest.json's "model") names no model: the
    activations were made by `strata synth`, so there is nothing to run text through."""
    return (model or {}).get("id") == SYNTHETIC_MODEL_ID


def lineage_of(cfg: SynthConfig) -> Lineage:
    rng = np.random.default_rng([cfg.seed, 0])
    rates = {"rotate": cfg.rotate, "split": cfg.split, "merge": cfg.merge, "vanish": cfg.vanish, "appear": cfg.appear}
    return build_lineage(rng, cfg.layers, cfg.d_model, cfg.features, cfg.active, cfg.freq_exponent, cfg.max_freq,
                         rates, cfg.drift, cfg.rotate_cos, cfg.child_cos)


def load_truth(run) -> Truth:
    """The generator's record of a synthetic run; StrataError (one line, the fix) for any other run."""
    from safetensors.numpy import load_file

    manifest = load_manifest(run)
    record_path, dirs_path = truth_paths(run)
    if not is_synthetic(manifest.model):
        raise StrataError(f"{run} is not a synthetic run (its activations come from {manifest.model.get('id')}), so "
                          f"there is no truth to score against; make one with `strata synth RUN` and train on it")
    if not record_path.is_file() or not dirs_path.is_file():
        raise StrataError(f"{run} is synthetic but its record {synth_dir(run)}/ is missing; re-create it with "
                          f"`{resume_command(run, manifest.config)}`")
    record = json.loads(record_path.read_text())
    arrays = load_file(str(dirs_path))
    dirs = {int(name.split(".")[1]): arr for name, arr in arrays.items() if name.startswith("layer.")}
    return Truth(record["config"], Lineage.from_record(record["lineage"], dirs))


def resume_command(run, config: dict) -> str:
    """The `strata synth ... --resume` line that continues or repairs a synthetic run with its flags."""
    defaults = SynthConfig().identity()
    flags = []
    for k, v in config.items():
        if k in defaults and k != "synth" and v != defaults[k]:
            flags += [f"--{k.replace('_', '-')}", str(v)]
    return shlex.join(["strata", "synth", str(run), *flags, "--resume"])


# ---------------------------------------------------------------- writing the run
def synthesize(cfg: SynthConfig) -> Manifest:
    keys = cfg.keys()
    if cfg.resume and cfg.overwrite:
        raise StrataError("--resume and --overwrite contradict each other; pick one")
    if cfg.tokens < cfg.context:
        raise StrataError(f"--tokens {cfg.tokens} is less than one context ({cfg.context}); raise it or lower --context")
    run = Path(cfg.run_dir)
    holds_run = check_target(cfg)  # refuses a folder Strata may not write into, changing nothing
    created = not run.exists()
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StrataError(f"cannot create the run directory {run} ({e.strerror}); choose a writable location") from None
    with run_lock(run, "strata synth"):
        old = load_manifest(run) if holds_run else None
        if old is not None and not cfg.overwrite:
            if not cfg.resume:
                raise StrataError(f"{run} already holds a run ({old.n_tokens} tokens of {old.model.get('id')}); pass "
                                  f"--resume to continue it or --overwrite to replace it")
            check_same_identity(run, old.config, cfg.identity())
        try:
            return _write(cfg, run, keys, old if cfg.resume else None, clear=holds_run and cfg.overwrite)
        except BaseException:
            if created:  # nothing of a folder this call made is kept
                with contextlib.suppress(OSError):
                    _remove_created(run)
            raise


def _remove_created(run: Path) -> None:
    import shutil

    clear_harvest(run)
    shutil.rmtree(synth_dir(run), ignore_errors=True)
    shutil.rmtree(run / "synth.partial", ignore_errors=True)
    layout.lock_path(run).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run.rmdir()


def _write(cfg: SynthConfig, run: Path, keys: list[str], old: Manifest | None, clear: bool) -> Manifest:
    from safetensors.numpy import save_file

    lineage = lineage_of(cfg)
    if clear:
        clear_harvest(run)
    manifest = old or Manifest(
        model={"id": SYNTHETIC_MODEL_ID, "source": "strata synth", "architecture": "synthetic",
               "n_layers": cfg.layers, "d_model": cfg.d_model, "vocab_size": len(lineage.features) + 1,
               "causal_lm": False},
        tokenizer={"name_or_path": None, "bos_per_context": False, "eos_token_id": None, "bos_token_id": None},
        keys=keys, dims={k: cfg.d_model for k in keys}, dtype=cfg.dtype, context_length=cfg.context,
        config=cfg.identity(), corpus={"kind": "synthetic", "name": f"strata synth (seed {cfg.seed})"},
        versions=software_versions(), precision={"precision": "fp32", "reason": "synthetic: no model runs"})
    save_manifest(run, manifest)  # first: every file below is explained by it (load_truth names the repair)
    with staged_dir(synth_dir(run), "synth") as tmp:
        record = {"format": FORMAT, "config": cfg.identity(), "lineage": lineage.to_record()}
        (tmp / "truth.json").write_text(json.dumps(record, indent=1) + "\n")
        save_file({f"layer.{L}": d for L, d in lineage.directions.items()}, str(tmp / "features.safetensors"))
    shard_contexts = max(1, cfg.shard_tokens // cfg.context)
    n_contexts = cfg.tokens // cfg.context
    listed = {s.index: s for s in manifest.shards}
    for i, first in enumerate(range(0, n_contexts, shard_contexts)):
        rec = listed.get(i)
        if rec is not None and _sound(run, rec, keys):
            continue
        rows = min(shard_contexts, n_contexts - first) * cfg.context
        files, stats = _write_shard(cfg, run, lineage, keys, i, first, rows)
        if rec is not None:
            rec.files = files
        else:
            for key, (s, sq, mx) in stats.items():
                add_norm_stats(manifest.norm_stats, key, rows, s, sq, mx)
            manifest.shards.append(ShardRecord(index=i, rows=rows, token_start=first * cfg.context, files=files,
                                               resume={"doc": first + rows // cfg.context, "offset": 0}))
            manifest.n_tokens += rows
        save_manifest(run, manifest)
    manifest.complete = True
    save_manifest(run, manifest)
    return manifest


def _sound(run: Path, rec: ShardRecord, keys: list[str]) -> bool:
    for name in ["tokens", *keys]:
        f = rec.files.get(name)
        if f is None or not (run / f["path"]).is_file() or file_sha256(run / f["path"]) != f["sha256"]:
            return False
    return True


def shard_codes(cfg: SynthConfig, lineage: Lineage, shard: int, rows: int) -> np.ndarray:
    """The feature coefficients [rows, n_features] of shard `shard` (depends only on seed and shard)."""
    return sample_codes(lineage, np.random.default_rng([cfg.seed, 1, shard]), rows)


def _write_shard(cfg: SynthConfig, run: Path, lineage: Lineage, keys: list[str], i: int, first_context: int,
                 rows: int) -> tuple[dict, dict]:
    import torch

    codes = shard_codes(cfg, lineage, i, rows)
    files, stats = {}, {}
    token_ids = np.where(codes.max(1) > 0, codes.argmax(1) + 1, 0).astype(np.int32)
    doc_ids = (first_context + np.arange(rows) // cfg.context).astype(np.int64)
    positions = (np.arange(rows) % cfg.context).astype(np.int32)
    path = layout.tokens_shard_path(run, i)
    with atomic_path(path) as tmp:
        write_tokens(tmp, token_ids, doc_ids, positions)
    files["tokens"] = {"path": relpath(run, path), "sha256": file_sha256(path)}
    for key in keys:
        site, _, layer = key.rpartition(".")
        L = int(layer)
        ids = lineage.changed_ids(L + 1) if site == "mlp_out" else lineage.live_ids(L)
        D = lineage.directions[L + 1 if site == "mlp_out" else L][ids]
        noise_key = "resid" if site == "mlp_in" else site  # mlp_in.L is resid.L, noise included
        rng = np.random.default_rng([cfg.seed, 2, i, L, SYNTH_SITES.index(noise_key)])
        x = codes[:, ids] @ D + cfg.noise * rng.standard_normal((rows, cfg.d_model), dtype=np.float32)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        norms = np.linalg.norm(x, axis=1)
        stats[key] = (float(norms.sum()), float((norms * norms).sum()), float(norms.max()))
        path = layout.acts_shard_path(run, key, i)
        with atomic_path(path) as tmp:
            w = ActivationShardWriter(tmp, cfg.d_model, cfg.dtype, rows)
            w.append(to_storage(xt, cfg.dtype))
            w.close()
        files[key] = {"path": relpath(run, path), "sha256": file_sha256(path)}
    return files, stats
