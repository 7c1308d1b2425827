"""Autointerp: detection and fuzzing separate a correct from a wrong explanation of a planted feature;
`strata eval --suite autointerp` scores sampled features per SAE and per layer; an explainer server that cannot
be reached fails that suite alone."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from activations import layout
from sae.analysis.explain import Explanation, TokenExplainer
from sae.evals.autointerp import balanced_accuracy, detection_score, fuzzing_score
from strata.cli import main

FAST = ["--batch-size", "256", "--expansion", "4", "--k", "8", "--progress", "false", "--device", "cpu"]


def planted_windows(n: int = 40, width: int = 11, seed: int = 0):
    """A feature that fires on token 42 (wherever it appears) in activating windows; non-activating windows
    never hold 42. Other tokens are drawn from 0..99."""
    rng = np.random.default_rng(seed)
    others = np.array([t for t in range(100) if t != 42])
    pos = rng.choice(others, size=(n, width))
    pos[:, width // 2] = 42
    pos[: n // 2, 2] = 42  # half of them hold it twice
    act = np.where(pos == 42, rng.uniform(1.0, 5.0, size=pos.shape), 0.0)
    neg = rng.choice(others, size=(n, width))
    return pos, act, neg


def test_detection_and_fuzzing_separate_a_right_from_a_wrong_explanation():
    pos, act, neg = planted_windows()
    ex = TokenExplainer()
    right = ex.explain(pos[0::2], act[0::2], None)
    assert right.tokens == {42}
    wrong = Explanation("fires on <17>", {17})
    det_right, f1_right = detection_score(ex, right, pos, neg, None)
    det_wrong, _ = detection_score(ex, wrong, pos, neg, None)
    assert det_right == 1.0 and f1_right == 1.0
    assert det_wrong < 0.7  # 17 turns up about as often in both kinds of window
    rng = np.random.default_rng(0)
    fuzz_right = fuzzing_score(ex, right, pos, act, None, rng)
    fuzz_wrong = fuzzing_score(ex, wrong, pos, act, None, rng)
    assert fuzz_right == 1.0  # the marks hold 42 exactly when they are the feature's tokens
    assert fuzz_wrong < 0.7


def test_balanced_accuracy_counts_both_classes_equally():
    truth = np.array([1, 1, 1, 1, 0], bool)
    assert balanced_accuracy(np.ones(5, bool), truth) == 0.5  # "always yes" is chance
    assert balanced_accuracy(truth, truth) == 1.0


@pytest.fixture
def trained(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train", "index", "share"))
    assert main(["train", str(run), "--name", "t", "--layers", "1,2", *FAST]) == 0
    assert main(["train", str(run), "--name", "ml", "--mode", "multilayer", "--layers", "1,2", *FAST]) == 0
    return run


@pytest.mark.usefixtures("one_thread")
def test_eval_autointerp_per_sae_and_layer(trained, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("autointerp decodes the vocabulary with the tokenizer alone, never the model")

    monkeypatch.setattr("activations.model.load_model", no_model)
    for name in ("t", "ml"):
        assert main(["eval", str(trained), "--name", name, "--suite", "autointerp", "--autointerp-features", "12",
                     "--device", "cpu"]) == 0
    bank = json.loads((layout.train_dir(trained, "t") / "eval.json").read_text())
    ml = json.loads((layout.train_dir(trained, "ml") / "eval.json").read_text())
    assert set(ml["saes"]["multilayer"]["per_key"]) == {"resid.1", "resid.2"}  # per layer of its input
    for r in (bank["saes"]["resid.1"], bank["saes"]["resid.2"], ml["saes"]["multilayer"]):
        o = r["overall"]
        assert 0 < o["autointerp_features_scored"] <= 12
        assert 0.0 <= o["autointerp_fuzzing_mean"] <= 1.0
        # the tiny model's features are mostly token detectors: the offline explainer beats chance
        assert 0.6 < o["autointerp_detection_mean"] <= 1.0
    d = bank["suites"]["autointerp"]["details"]
    assert sum(d["histograms"]["resid.1"]["detection"]) == bank["saes"]["resid.1"]["overall"]["autointerp_features_scored"]
    first = d["per_feature"]["resid.1"]["resid.1"][0]
    assert first["explanation"].startswith("fires on") and first["activating"] > 0
    assert d["vocab_note"] == "" and "'" in first["explanation"]  # tokens shown as text ('word'), not ids (<12>)
    assert "autointerp: autointerp_detection_f1_mean" in capsys.readouterr().out


@pytest.mark.usefixtures("one_thread")
def test_unreachable_explainer_fails_autointerp_alone(trained, capsys):
    code = main(["eval", str(trained), "--name", "t", "--suite", "autointerp,core", "--ce-contexts", "0",
                 "--explainer", "openai", "--explainer-url", "http://127.0.0.1:9/v1", "--explainer-model", "m",
                 "--autointerp-features", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "autointerp" in err[0] and "127.0.0.1:9" in err[0] and "core" in err[0]
    out = json.loads((layout.train_dir(trained, "t") / "eval.json").read_text())
    assert out["suites"]["autointerp"]["status"] == "failed"
    assert out["suites"]["core"]["status"] == "ok" and "fvu" in out["saes"]["resid.1"]["overall"]


def test_the_tokenizer_alone_decodes_as_the_loaded_model(tiny_llama, tmp_path, monkeypatch):
    from activations.model import load_model, load_tokenizer
    from activations.tokens import decode_each

    lm = load_model(str(tiny_llama), "cpu")
    everything = range(len(lm.tokenizer))
    assert decode_each(load_tokenizer(str(tiny_llama)), everything) == decode_each(lm.tokenizer, everything)
    # the embedded GGUF model: from its dequantised cache (when this machine has one) and straight from the file
    cached = load_tokenizer()
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    direct = load_tokenizer()
    assert len(direct) == len(cached) > 1000
    assert decode_each(direct, range(len(direct))) == decode_each(cached, range(len(cached)))
    assert not (tmp_path / "cache").exists()  # the tokenizer alone never dequantises the weights
