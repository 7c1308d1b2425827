"""`strata verify` and `strata info`: check a run's files against its manifest, and summarise it."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from activations.harvest_dir import resume_command
from activations.manifest import file_sha256, load_manifest
from activations.shards import ACTS, TOKEN_FIELDS, from_storage


def verify_run(run) -> list[str]:
    """Every problem found, one line each naming the shard file; empty when the run is sound."""
    m = load_manifest(run)
    run = Path(run)
    problems = []
    total = 0
    for s in m.shards:
        if s.token_start != total:
            problems.append(f"shard {s.index}: token_start {s.token_start} but the shards before it hold {total} tokens")
        total += s.rows
        for name in ["tokens"] + m.keys:
            rec = s.files.get(name)
            if rec is None:
                problems.append(f"shard {s.index}: no {name} file listed in the manifest")
                continue
            path = run / rec["path"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            if file_sha256(path) != rec["sha256"]:
                problems.append(f"{path}: checksum mismatch (corrupt or modified)")
            try:
                with h5py.File(path, "r") as f:
                    if name == "tokens":
                        for field in TOKEN_FIELDS:
                            if f[field].shape != (s.rows,):
                                problems.append(f"{path}: {field} has shape {f[field].shape}, expected ({s.rows},)")
                    else:
                        ds = f[ACTS]
                        if ds.shape != (s.rows, m.dims[name]):
                            problems.append(f"{path}: shape {ds.shape}, expected ({s.rows}, {m.dims[name]})")
                        else:
                            for a in range(0, s.rows, 65536):
                                x = from_storage(ds[a:a + 65536], m.dtype)
                                if not np.isfinite(x).all():
                                    row = a + int(np.argwhere(~np.isfinite(x))[0][0])
                                    problems.append(f"{path}: non-finite value at row {row}")
                                    break
            except (OSError, KeyError) as e:
                problems.append(f"{path}: unreadable HDF5 ({str(e).splitlines()[0][:120]})")
    if total != m.n_tokens:
        problems.append(f"manifest: n_tokens {m.n_tokens} but the shards hold {total}")
    return problems


def repair_command(run) -> str:
    """The command that re-creates every shard file the manifest lists but that is missing or damaged."""
    return resume_command(run, load_manifest(run).config)


def run_summary(run) -> str:
    m = load_manifest(run)
    lines = [
        f"run        {run}",
        f"model      {m.model['id']} ({m.model['architecture']}, {m.n_layers} layers, d_model {m.d_model})",
        f"corpus     {m.corpus.get('name') or m.corpus.get('path')} ({m.corpus.get('kind')})",
        f"tokens     {m.n_tokens:,} in {len(m.shards)} shards, context {m.context_length}, stored as {m.dtype}"
        + ("" if m.complete else f"  [incomplete: {resume_command(run, m.config)}]"),
        f"keys       {len(m.keys)}: {', '.join(m.keys)}",
        "mean norm  " + ", ".join(f"{k} {v['mean_norm']:.3g}" for k, v in m.norm_stats.items()),
    ]
    return "\n".join(lines)
