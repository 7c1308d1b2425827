"""Sparse probing: on a toy with one informative latent the k=1 probe finds it; the built-in tasks are balanced
and the same every time; `strata eval --suite probing` probes a user's labelled file per SAE and per layer."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from activations import layout
from sae.evals.probe_tasks import builtin_tasks
from sae.evals.probing import binary_tasks, probe_accuracy, sparse_probe_accuracy
from strata.cli import main

FAST = ["--batch-size", "256", "--expansion", "4", "--k", "8", "--progress", "false", "--device", "cpu"]


def test_one_informative_latent_is_found_at_k1():
    rng = np.random.default_rng(0)
    n, F = 400, 256
    y = rng.random(n) < 0.5
    codes = rng.exponential(1.0, size=(n, F)) * (rng.random((n, F)) < 0.05)  # sparse noise
    codes[:, 7] = np.where(y, 2.0, 0.0) + 0.3 * rng.random(n) * y  # latent 7 fires on the class alone
    acc, latents = sparse_probe_accuracy(codes[:300], y[:300], codes[300:], y[300:], k=1)
    assert latents == [7] and acc == 1.0
    noise_only = np.delete(codes, 7, axis=1)
    acc_noise, _ = sparse_probe_accuracy(noise_only[:300], y[:300], noise_only[300:], y[300:], k=1)
    assert acc_noise < 0.7  # without it, one latent is near chance


def test_raw_probe_reads_a_linear_direction():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 32))
    y = x @ rng.normal(size=32) > 0
    assert probe_accuracy(x[:240], y[:240], x[240:], y[240:]) > 0.9


def test_multiclass_tasks_become_balanced_one_vs_rest():
    labels = np.array(["a"] * 30 + ["b"] * 30 + ["c"] * 60)
    tasks = binary_tasks(labels)
    assert [t[0] for t in tasks] == ["a vs rest", "b vs rest", "c vs rest"]
    for _, tr, te, pos in tasks:
        assert set(tr).isdisjoint(te)
        assert pos[tr].sum() * 2 == len(tr) and pos[te].sum() * 2 == len(te)


def test_builtin_tasks_are_balanced_and_deterministic():
    a, b = builtin_tasks(20), builtin_tasks(20)
    assert a == b
    assert set(a) == {"code_vs_prose", "stdlib_package", "docs_vs_docstring"}
    texts, labels = a["code_vs_prose"]
    assert labels.count("code") == labels.count("prose") == 20
    code = [t for t, lab in zip(texts, labels) if lab == "code"]
    assert all(t.startswith("   ") for t in code)
    assert sorted(set(a["stdlib_package"][1])) == ["asyncio", "email", "unittest", "xml"]


@pytest.mark.usefixtures("one_thread")
def test_eval_probing_user_task_per_sae_and_layer(tmp_path, tiny_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train", "index", "share"))
    assert main(["train", str(run), "--name", "t", "--layers", "1,2", *FAST]) == 0
    # a task any model separates: the text's own tokens differ between the classes
    task = tmp_path / "colours.jsonl"
    rows = [{"text": f"the {w} one number {i}", "label": lab}
            for i in range(24) for w, lab in (("red", "warm"), ("blue", "cold"))]
    task.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["eval", str(run), "--name", "t", "--suite", "probing", "--probe-tasks", str(task),
                 "--device", "cpu"]) == 0
    out = json.loads((layout.train_dir(run, "t") / "eval.json").read_text())
    assert out["suites"]["probing"]["details"]["tasks"] == {"colours": {"examples": 48, "classes": ["cold", "warm"]}}
    for sid, key in (("resid.1", "resid.1"), ("resid.2", "resid.2")):
        m = out["saes"][sid]["per_key"][key]
        assert m["probing_full_accuracy"] == 1.0  # the raw activations hold the colour word
        assert all(0.0 <= m[f"probing_k{k}_accuracy"] <= 1.0 for k in (1, 2, 5, 20))
        assert m["probing_k20_accuracy"] >= 0.8
    assert "probing: probing_full_accuracy" in capsys.readouterr().out
