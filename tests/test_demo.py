"""The README's main command, end to end on a tiny model: every stage leaves what the next one reads."""
from __future__ import annotations

import json

from activations import layout
from activations.verify import verify_run
from sae.checkpoint import load_saes
from strata.pipeline import DemoConfig, run_demo


def test_demo_runs_the_whole_data_path_and_resumes(tmp_path, tiny_llama, capsys):
    run = tmp_path / "demo"
    cfg = DemoConfig(run_dir=str(run), model=str(tiny_llama), layers="0-3", max_tokens=4096, context=32,
                     shard_tokens=1024, expansion=2, k=4, batch_size=256, epochs=1, serve=False)
    run_demo(cfg)
    assert verify_run(run) == []
    mlsae, bank = load_saes(run, "mlsae"), load_saes(run, "bank")
    assert len(mlsae) == 1 and len(bank) == 4, "one SAE shared by the 4 layers; one SAE per layer"
    for name in ("mlsae", "bank"):
        assert (layout.train_dir(run, name) / "eval.json").is_file()
        assert layout.index_path(run, name).is_file()
    metrics = [json.loads(line) for line in layout.metrics_path(run, "mlsae").read_text().splitlines()]
    assert metrics and metrics[-1]["step"] > 0
    mtime = layout.index_path(run, "bank").stat().st_mtime
    capsys.readouterr()
    run_demo(cfg)  # a second run reuses every finished stage
    assert "already complete" in capsys.readouterr().out
    assert len(load_saes(run, "bank")) == 4 and layout.index_path(run, "bank").stat().st_mtime >= mtime
