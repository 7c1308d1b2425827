"""The README's main command, end to end on a tiny model: every stage leaves what the next one reads."""
from __future__ import annotations

import dataclasses
import json

from activations import layout
from activations.verify import verify_run
from sae.checkpoint import load_saes, read_checkpoint
from strata.pipeline import BF16_TOKENS, FP32_TOKENS, DemoConfig, budget, run_demo


def test_demo_runs_the_whole_data_path_and_resumes(tmp_path, tiny_llama, capsys):
    run = tmp_path / "demo"
    cfg = DemoConfig(run_dir=str(run), model=str(tiny_llama), layers="0-3", max_tokens=4096, context=32,
                     shard_tokens=1024, expansion=2, k=4, batch_size=256, epochs=1, serve=False, precision="fp32")
    run_demo(cfg)
    out = capsys.readouterr().out
    assert "[0/5] precision fp32 (asked for with --precision) -> budget: harvest 4,096 tokens, 1 epoch(s)" in out
    for name in ("mlsae", "bank"):  # the number of training tokens is printed
        tokens = int(read_checkpoint(run, name)[0]["tokens"])
        assert 0 < tokens <= 4096 and f"training tokens: {tokens:,} per SAE" in out
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
    again = dataclasses.replace(cfg, max_tokens=0, epochs=0)  # rerun without a budget: it keeps the run's own
    run_demo(again)  # a second run reuses every finished stage
    out = capsys.readouterr().out
    assert "already complete" in out and "budget: harvest 4,096 tokens, 1 epoch(s)" in out
    assert len(load_saes(run, "bank")) == 4 and layout.index_path(run, "bank").stat().st_mtime >= mtime


def test_the_budget_follows_the_precision_the_probe_picks():
    """Where bf16 is fast the demo harvests 4x the tokens and trains one epoch over them; elsewhere it keeps the
    fp32 budget (4 epochs over a quarter of the tokens); flags given by the user win."""
    assert budget(DemoConfig(), "fp32") == (FP32_TOKENS, 4)
    assert budget(DemoConfig(), "bf16") == (BF16_TOKENS, 1) and BF16_TOKENS >= 4 * FP32_TOKENS
    assert budget(DemoConfig(max_tokens=1000, epochs=2), "bf16") == (1000, 2)
