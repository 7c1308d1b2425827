"""Absorption (SAEBench's first-letter task): a dictionary built to absorb and one built not to give the two
known answers; `strata eval --suite absorption` writes the metrics per SAE and per layer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from activations import layout
from sae.evals.absorption import absorption_scores, alpha_words, letter_probe
from strata.cli import main

FAST = ["--batch-size", "256", "--expansion", "4", "--k", "8", "--progress", "false", "--device", "cpu"]


def planted(absorb: bool, letters: int = 4, per_letter: int = 40, d: int = 64, seed: int = 0):
    """Words of `letters` first letters: x = u_letter + 0.5 v_word (+ noise), u and v orthogonal. The dictionary
    has one latent per letter (decoder u) and one per word. Built not to absorb: the letter latent fires on every
    word of its letter, the word latent carries v. Built to absorb: on every other word the letter latent is
    silent and that word's latent fires instead, its decoder u_letter + 0.5 v_word (it carries the letter)."""
    rng = np.random.default_rng(seed)
    n = letters * per_letter
    y = np.repeat(np.arange(letters), per_letter)
    v = rng.normal(size=(n, d))
    v[:, :letters] = 0
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    u = np.eye(d)[:letters]
    x = u[y] + 0.5 * v + 0.01 * rng.normal(size=(n, d))
    dirs = np.concatenate([u, v])  # latents 0..letters-1: letters; then one per word
    codes = np.zeros((n, letters + n))
    absorbed = absorb & (np.arange(n) % 2 == 0)
    codes[np.arange(n), y] = np.where(absorbed, 0.0, 1.0)
    codes[np.arange(n), letters + np.arange(n)] = np.where(absorbed, 1.0, 0.5)
    dirs[letters + np.flatnonzero(absorbed)] = u[y[absorbed]] + 0.5 * v[absorbed]
    order = rng.permutation(n)  # train / test words mixed
    return x[order], y[order], codes[order], dirs


@pytest.mark.parametrize("absorb, expected", [(False, 0.0), (True, 0.5)])
def test_planted_dictionaries_give_the_known_absorption(absorb, expected):
    x, y, codes, dirs = planted(absorb)
    n_tr = int(0.8 * len(y))
    probe = letter_probe(x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:])
    assert min(probe.f1.values()) > 0.95  # the letter is linearly there
    r = absorption_scores(probe, x[n_tr:], y[:n_tr], y[n_tr:], codes[:n_tr], codes[n_tr:], dirs)
    assert r["absorption_letters_scored"] == 4
    # every letter's main latent is its letter latent, found by the k-sparse probe
    assert [v["main_latents"] for v in r["letters"].values()] == [[0], [1], [2], [3]]
    # half the words of each letter are absorbed (give or take the test split's luck)
    assert r["absorption_mean"] == pytest.approx(expected, abs=0.15)
    assert r["absorption_full"] == pytest.approx(expected, abs=0.15)
    if not absorb:
        assert r["absorption_mean"] == 0.0 and r["absorption_full"] == 0.0


def test_words_are_single_alphabetic_tokens_with_a_leading_space():
    vocab = [" the", "the", " a", " x1", " Über", " Tree", "  no", " ok"]
    assert alpha_words(vocab) == [(0, "the"), (5, "Tree"), (7, "ok")]


@pytest.fixture(scope="module")
def wordy_run(tmp_path_factory):
    """A tiny random Llama whose tokenizer has 1,024 tokens (the shared one's 384 hold only 23 single-token
    words), harvested like tiny_run."""
    from conftest import harvest_tiny, make_model, make_tokenizer

    folder = tmp_path_factory.mktemp("wordy-llama")
    tok = make_tokenizer(vocab_size=1024)
    make_model("llama", len(tok)).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    run = tmp_path_factory.mktemp("wordy") / "run"
    harvest_tiny(run, folder, sites="resid", layers="1,2")
    return run


@pytest.mark.usefixtures("one_thread")
def test_eval_absorption_per_sae_and_layer(wordy_run, capsys):
    run = wordy_run
    assert main(["train", str(run), "--name", "ml", "--mode", "multilayer", "--layers", "1,2", *FAST]) == 0
    assert main(["eval", str(run), "--name", "ml", "--suite", "absorption", "--absorption-words", "300",
                 "--device", "cpu"]) == 0
    out = json.loads((layout.train_dir(run, "ml") / "eval.json").read_text())
    assert out["suites"]["absorption"]["status"] == "ok"
    r = out["saes"]["multilayer"]
    assert set(r["per_key"]) == {"resid.1", "resid.2"}  # a multi-layer SAE: per layer of its input
    for m in r["per_key"].values():
        assert m["absorption_letters_scored"] >= 0
        if m["absorption_letters_scored"]:
            assert 0.0 <= m["absorption_mean"] <= 1.0 and 0.0 <= m["absorption_full"] <= 1.0
    assert "absorption: absorption_" in capsys.readouterr().out


def test_word_activations_through_the_prompt_cache_match_a_full_forward(tiny_llama):
    """The cached prompt gives each word the activations a forward over the whole prompt and word gives."""
    import torch

    from activations.hooks import capture
    from activations.model import load_model
    from sae.evals.absorption import PROMPT, word_activations
    from sae.evals.model_inputs import token_ids

    lm = load_model(str(tiny_llama), "cpu")
    words = [30, 31, 200, 301]
    got = word_activations(lm, ["resid.1", "mlp_out.2"], words, torch.device("cpu"), batch=3)
    prefix = token_ids(lm.tokenizer, PROMPT, 1 << 20)
    full = capture(lm.model, ["resid.1", "mlp_out.2"], torch.tensor([prefix + [w] for w in words]))
    for key in ("resid.1", "mlp_out.2"):
        assert np.allclose(got[key], full[key][:, -1].numpy(), atol=1e-4)
