"""`strata train --seeds 0,1,2`: the same config trained once per seed in one pass over the data, and `strata eval`
reporting each SAE and the mean ± std of each seed group, on a harvest of the tiny random Llama."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import sae.train
from activations import layout
from sae.checkpoint import load_saes
from strata.cli import main

FAST = ["--batch-size", "256", "--expansion", "4", "--k", "8", "--progress", "false", "--device", "cpu"]
pytestmark = pytest.mark.usefixtures("one_thread")


def strata(*args) -> int:
    return main([str(a) for a in args])


def test_seeds_train_distinct_saes_of_one_config_on_the_same_batches(run):
    assert strata("train", run, "--name", "s", "--layers", "1,2", "--seeds", "0,1,2", "--max-tokens", "2048", *FAST) == 0
    saes = load_saes(run, "s")
    assert sorted(saes) == ["resid.1.s0", "resid.1.s1", "resid.1.s2", "resid.2.s0", "resid.2.s1", "resid.2.s2"]
    cfgs = {sid: {k: v for k, v in sae.cfg.to_dict().items()} for sid, sae in saes.items()}
    assert cfgs["resid.1.s0"] == cfgs["resid.1.s1"] == cfgs["resid.1.s2"]  # same config, scales and tokens seen
    assert cfgs["resid.1.s0"]["tokens_seen"] == 2048
    w = {sid: sae.W_dec.detach() for sid, sae in saes.items()}
    assert not torch.allclose(w["resid.1.s0"], w["resid.1.s1"]) and not torch.allclose(w["resid.1.s1"], w["resid.1.s2"])
    # each seed's SAEs are initialised as a run with --seed <that seed> (data order stays --seed's: same batches)
    assert strata("train", run, "--name", "plain", "--layers", "1,2", "--max-tokens", "2048", *FAST) == 0
    plain = load_saes(run, "plain")
    assert sorted(plain) == ["resid.1", "resid.2"]  # without --seeds the ids are unchanged
    for key in plain:
        assert torch.equal(plain[key].W_dec, saes[f"{key}.s0"].W_dec)
    rec = json.loads(layout.metrics_path(run, "s").read_text().splitlines()[-1])
    assert sorted(rec["saes"]) == sorted(saes)


def test_eval_reports_each_seed_and_mean_and_std_across_seeds(run, capsys):
    assert strata("train", run, "--name", "m", "--mode", "multilayer", "--seeds", "3,5", "--max-tokens", "2048", *FAST) == 0
    capsys.readouterr()
    assert strata("eval", run, "--name", "m", "--batch-size", "256", "--ce-contexts", "2", "--device", "cpu") == 0
    out = capsys.readouterr().out
    result = json.loads((layout.train_dir(run, "m") / "eval.json").read_text())
    assert sorted(result["saes"]) == ["multilayer.s3", "multilayer.s5"]
    group = result["seed_groups"]["multilayer"]
    assert group["seeds"] == [3, 5] and group["sae_ids"] == ["multilayer.s3", "multilayer.s5"]
    fvus = [result["saes"][sid]["overall"]["fvu"] for sid in group["sae_ids"]]
    assert group["overall"]["fvu"]["mean"] == pytest.approx(sum(fvus) / 2)
    assert group["overall"]["fvu"]["std"] == pytest.approx(abs(fvus[0] - fvus[1]) / 2 ** 0.5)  # sample std, n=2
    assert group["overall"]["fvu"]["std"] > 0  # different inits give different SAEs
    assert set(group["per_key"]) == {"resid.0", "resid.1", "resid.2", "resid.3"}
    assert "ce_loss_recovered" in group["overall"] and "ce_loss_recovered" in group["per_key"]["resid.1"]
    m = group["overall"]
    assert "multilayer.s3: FVU" in out and "multilayer.s5: FVU" in out
    assert "across seeds (mean ± std):" in out
    assert f"multilayer: seeds 3,5  FVU {m['fvu']['mean']:.4f} ± {m['fvu']['std']:.4f}" in out
    assert f"CE recovered {m['ce_loss_recovered']['mean']:.3f} ± " in out


def test_eval_of_an_unseeded_run_has_no_seed_groups(run, capsys):
    assert strata("train", run, "--name", "u", "--layers", "1", "--max-tokens", "1024", *FAST) == 0
    assert strata("eval", run, "--name", "u", "--batch-size", "256", "--ce-contexts", "0", "--device", "cpu") == 0
    assert "across seeds" not in capsys.readouterr().out
    assert "seed_groups" not in json.loads((layout.train_dir(run, "u") / "eval.json").read_text())


def test_an_interrupted_seeded_run_resumes_to_the_same_weights(run, tmp_path, monkeypatch):
    args = ["--name", "r", "--layers", "0,3", "--seeds", "0,1", "--epochs", "2", "--batch-size", "128",
            "--checkpoint-every", "4", *FAST[2:]]
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    assert strata("train", ref, *args) == 0

    real, calls = sae.train.write_checkpoint, []

    def stop_after_second(*a, **kw):  # Ctrl+C right after the second checkpoint
        real(*a, **kw)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sae.train, "write_checkpoint", stop_after_second)
    assert strata("train", run, *args) == 130  # interrupted
    monkeypatch.setattr(sae.train, "write_checkpoint", real)
    state = json.loads((layout.checkpoint_dir(run, "r") / "state.json").read_text())
    assert state["step"] == 8 and not state["done"]
    assert strata("train", run, *args, "--resume") == 0
    a, b = load_saes(run, "r"), load_saes(ref, "r")
    assert sorted(a) == sorted(b) == ["resid.0.s0", "resid.0.s1", "resid.3.s0", "resid.3.s1"]
    for sid in b:
        for name, p in b[sid].state_dict().items():
            assert torch.equal(a[sid].state_dict()[name], p), (sid, name)


def test_feature_matches_across_depth_stay_within_one_seed(run):
    """analyze chains matches between adjacent layers of a bank: with --seeds, each seed is its own bank."""
    from sae.analysis.depth import banks

    assert strata("train", run, "--name", "b", "--layers", "0-2", "--seeds", "0,1", "--max-tokens", "512", *FAST) == 0
    assert sorted(banks(load_saes(run, "b"))) == [["resid.0.s0", "resid.1.s0", "resid.2.s0"],
                                                 ["resid.0.s1", "resid.1.s1", "resid.2.s1"]]


def test_seeds_read_from_a_yaml_list_or_a_flag(tmp_path):
    from sae.train_config import TrainConfig
    from strata.config import build_config

    f = tmp_path / "t.yaml"
    f.write_text("seeds: [0, 1, 2]\n")
    assert build_config(TrainConfig, str(f), {}, run_dir="r").seed_list() == [0, 1, 2]
    assert build_config(TrainConfig, None, {"seeds": " 4, 7"}, run_dir="r").seed_list() == [4, 7]
    assert build_config(TrainConfig, None, {}, run_dir="r").seed_list() is None  # no --seeds: one SAE per id
