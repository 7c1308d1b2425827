"""`strata eval --suite ...`: suites run in one pass, each keeps the others' earlier results in eval.json, and a
suite that fails is recorded while the rest still finish."""
from __future__ import annotations

import json
import textwrap

import pytest

from activations import layout
from sae.evals import suite as suites
from strata.cli import main

FAST = ["--batch-size", "256", "--expansion", "4", "--k", "8", "--progress", "false", "--device", "cpu"]
EVAL = ["--batch-size", "256", "--ce-contexts", "2", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def strata(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture
def trained(run):
    assert strata("train", run, "--name", "t", "--layers", "1,2", *FAST) == 0
    return run


@pytest.fixture
def extra_suites(tmp_path, monkeypatch):
    """Two suites a plugin could add: `norms` reports each SAE's mean decoder norm; `broken` always fails."""
    (tmp_path / "my_suites.py").write_text(textwrap.dedent('''
        from activations.errors import StrataError

        def run(ctx):
            return {"saes": {sid: {"overall": {"norms_mean": float(sae.W_dec.norm(dim=1).mean())},
                                   "per_key": {sae.cfg.in_keys[0]: {"norms_mean": 1.0}}}
                             for sid, sae in ctx.saes.items()}, "details": {"what": "decoder norms"}}

        def broken(ctx):
            raise StrataError("cannot reach the explainer server at http://127.0.0.1:9; start it and rerun")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(suites.SUITES, "norms", ("my_suites", "mean decoder norm"))
    monkeypatch.setitem(suites.SUITES, "broken", ("my_suites_broken", "always fails"))
    (tmp_path / "my_suites_broken.py").write_text("from my_suites import broken as run\n")


def read_eval(run):
    return json.loads((layout.train_dir(run, "t") / "eval.json").read_text())


def test_suites_add_up_in_eval_json(trained, extra_suites, capsys):
    assert strata("eval", trained, "--name", "t", *EVAL) == 0  # core by default
    first = read_eval(trained)
    assert first["suites"]["core"]["status"] == "ok" and "fvu" in first["suites"]["core"]["metrics"]
    fvu = first["saes"]["resid.1"]["overall"]["fvu"]

    assert strata("eval", trained, "--name", "t", "--suite", "norms", *EVAL) == 0
    both = read_eval(trained)
    assert set(both["suites"]) == {"core", "norms"}
    assert both["saes"]["resid.1"]["overall"]["fvu"] == fvu  # core's results are kept
    assert 0.9 < both["saes"]["resid.1"]["overall"]["norms_mean"] < 1.1  # unit-norm decoders
    assert "norms: norms_mean" in capsys.readouterr().out

    # a suite that fails is recorded; the others finish and are written; one line, exit 2
    assert strata("eval", trained, "--name", "t", "--suite", "broken,core", *EVAL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken" in err[0] and "cannot reach the explainer" in err[0] and "core" in err[0]
    after = read_eval(trained)
    assert after["suites"]["broken"]["status"] == "failed"
    assert after["suites"]["core"]["status"] == "ok" and "norms" in after["suites"]
    assert after["saes"]["resid.1"]["overall"]["norms_mean"] == both["saes"]["resid.1"]["overall"]["norms_mean"]


def test_retraining_drops_results_of_the_old_weights(trained, extra_suites):
    assert strata("eval", trained, "--name", "t", "--suite", "core,norms", *EVAL) == 0
    assert strata("train", trained, "--name", "t", "--layers", "1,2", "--overwrite", *FAST) == 0
    assert strata("eval", trained, "--name", "t", *EVAL) == 0
    again = read_eval(trained)
    assert set(again["suites"]) == {"core"}
    assert "norms_mean" not in again["saes"]["resid.1"]["overall"]
