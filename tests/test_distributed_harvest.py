"""Scale-out: a harvest under `torchrun --nproc-per-node 2` (gloo) reads back exactly like a single-process run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import harvest_tiny

from activations.manifest import load_manifest
from activations.reader import ActivationReader, open_run

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_harvest_equals_single_process(tmp_path, tiny_llama):
    opts = dict(sites="resid,mlp_out", layers="0-2", context=32, batch_contexts=4, shard_tokens=256, max_tokens=3000)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                           "-m", "strata.cli", "harvest", str(tmp_path / "dist"), "--model", str(tiny_llama),
                           "--progress", "false", *flags], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    harvest_tiny(tmp_path / "single", tiny_llama, **opts)
    dist, single = load_manifest(tmp_path / "dist"), load_manifest(tmp_path / "single")
    assert dist.complete and dist.n_tokens == single.n_tokens == 3000 // 32 * 32
    assert [s.files for s in dist.shards] == [s.files for s in single.shards], "same shards, same checksums"
    assert not (tmp_path / "dist" / "parts").exists()
    rows = sorted(int(r) for b in ActivationReader(open_run(tmp_path / "dist"), ["resid.2"], 512) for r in b.rows)
    assert rows == list(range(dist.n_tokens)), "no token lost or duplicated"
