"""Integration: a short harvest from the real packaged SmolLM2-135M, a TopK SAE trained on it, evaluated on
held-out shards (reconstruction and CE loss recovered through the spliced model)."""
from __future__ import annotations

import json

import pytest

from activations import layout
from strata.cli import main


@pytest.mark.slow
def test_topk_on_real_smollm2_reaches_low_fvu(tmp_path):
    run = tmp_path / "smol"
    assert main(["harvest", str(run), "--layers", "6", "--sites", "resid", "--max-tokens", "8192",
                 "--shard-tokens", "2048", "--progress", "false"]) == 0
    assert main(["train", str(run), "--arch", "topk", "--expansion", "4", "--batch-size", "512", "--epochs", "6",
                 "--heldout-fraction", "0.25", "--log-every", "12", "--progress", "false"]) == 0
    assert main(["eval", str(run), "--name", "topk-layer", "--ce-contexts", "4", "--batch-size", "1024"]) == 0
    result = json.loads((layout.train_dir(run, "topk-layer") / "eval.json").read_text())["saes"]["resid.6"]
    assert result["overall"]["fvu"] < 0.5, result["overall"]
    assert result["overall"]["l0"] == 32
    assert result["overall"]["ce_loss_recovered"] > 0.5, result["per_key"]
