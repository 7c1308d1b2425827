"""Scale-out: a harvest under `torchrun --nproc-per-node 2` (gloo) reads back exactly like a single-process run."""
from __future__ import annotations

from conftest import harvest_tiny, torchrun_strata

from activations.manifest import load_manifest
from activations.reader import ActivationReader, open_run


def test_two_process_harvest_equals_single_process(tmp_path, tiny_llama):
    opts = dict(sites="resid,mlp_out", layers="0-2", context=32, batch_contexts=4, shard_tokens=256, max_tokens=3000)
    torchrun_strata("harvest", 29517, tmp_path / "dist", model=tiny_llama, **opts)
    harvest_tiny(tmp_path / "single", tiny_llama, **opts)
    dist, single = load_manifest(tmp_path / "dist"), load_manifest(tmp_path / "single")
    assert dist.complete and dist.n_tokens == single.n_tokens == 3000 // 32 * 32
    assert [s.files for s in dist.shards] == [s.files for s in single.shards], "same shards, same checksums"
    assert not (tmp_path / "dist" / "parts").exists()
    rows = sorted(int(r) for b in ActivationReader(open_run(tmp_path / "dist"), ["resid.2"], 512) for r in b.rows)
    assert rows == list(range(dist.n_tokens)), "no token lost or duplicated"
