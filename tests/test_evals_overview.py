"""The Overview shows the eval suites' metrics (absorption, probing, autointerp) per SAE and per layer, and its
frontier takes any two eval metrics as axes: in Streamlit's AppTest and in a real browser."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_dashboard_support import dashboard_server, needs_chromium, synthetic_run

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
# absorption per SAE: resid.2 absorbs least; its L0 (4) equals the others', so it alone is on the frontier
ABSORPTION = {"resid.0": 0.30, "resid.1": 0.20, "resid.2": 0.10}


def add_suites(run: Path) -> None:
    """Add the three suites' metrics to the synthetic run's eval.json, as `strata eval --suite ...` writes them."""
    path = run / "train" / "synth" / "eval.json"
    ev = json.loads(path.read_text())
    for i, (sid, r) in enumerate(ev["saes"].items()):
        extra = {"absorption_mean": ABSORPTION.get(sid, 0.5), "absorption_full": 0.05, "absorption_letters_scored": 20,
                 "probing_k1_accuracy": 0.7 + 0.01 * i, "probing_k5_accuracy": 0.8, "probing_k20_accuracy": 0.9,
                 "probing_full_accuracy": 0.95, "autointerp_detection_mean": 0.75, "autointerp_fuzzing_mean": 0.65}
        r["overall"].update(extra)
        r["per_key"] = {key: dict(extra, absorption_mean=extra["absorption_mean"] + 0.01 * j)
                        for j, key in enumerate(r.get("per_key") or [sid if sid.startswith("resid") else "resid.1"])}
    path.write_text(json.dumps(ev))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run = synthetic_run(tmp_path_factory.mktemp("evals-overview") / "run", [f"tok{i}" for i in range(40)])
    add_suites(run)
    return run


def test_overview_table_per_layer_and_frontier_axes(evaluated, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("STRATA_RUN", str(evaluated))
    monkeypatch.setenv("STRATA_READ_ONLY", "1")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value.set_index("SAE")
    assert {"absorption", "full absorption", "probe k=1", "probe raw", "detection", "fuzzing"} <= set(table.columns)
    assert table.loc["resid.2", "absorption"] == pytest.approx(0.10)
    assert table.loc["resid.0", "probe k=1"] == pytest.approx(0.70)
    per_layer = next(d.value for d in at.dataframe if "key" in d.value.columns)
    row = per_layer[(per_layer["SAE"] == "resid.1") & (per_layer["key"] == "resid.1")].iloc[0]
    assert row["absorption_mean"] == pytest.approx(0.20) and row["probing_full_accuracy"] == pytest.approx(0.95)

    # the frontier of evaluated SAEs: L0 against FVU by default, any eval metric on either axis
    assert "absorption_mean" in at.selectbox(key="fy-evaluated").options
    at.selectbox(key="fy-evaluated").select("absorption_mean").run()
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "absorption_mean frontier" in c.proto.spec)
    front = next(t for t in spec["data"] if t.get("name") == "frontier")
    assert list(front["y"]) == [pytest.approx(0.10)]  # lower absorption is better: one SAE beats the others
    at.selectbox(key="fy-evaluated").select("probing_k1_accuracy").run()
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "probing_k1_accuracy frontier" in c.proto.spec)
    front = next(t for t in spec["data"] if t.get("name") == "frontier")
    sae_points = next(t for t in spec["data"] if t.get("name") == "SAEs")
    assert max(front["y"]) == pytest.approx(max(sae_points["y"]))  # higher accuracy is better: the best is on it


def test_sweep_frontier_takes_any_eval_metric_as_its_y_axis(tmp_path):
    from activations import layout
    from strata.sweep_report import _eval_means, frontier_figure, member_metrics

    # what a member's eval.json gives the summary: every suite's metrics, averaged over its SAEs
    tdir = layout.train_dir(tmp_path, "m-0")
    tdir.mkdir(parents=True)
    (tdir / "eval.json").write_text(json.dumps({"saes": {
        "resid.1": {"overall": {"l0": 8.0, "fvu": 0.3, "absorption_mean": 0.2, "probing_k1_accuracy": 0.7}},
        "resid.2": {"overall": {"l0": 8.0, "fvu": 0.4, "absorption_mean": 0.4, "probing_k1_accuracy": 0.9}}}}))
    saes, source = member_metrics(tmp_path, "m-0")
    assert source == "eval"
    assert _eval_means(saes) == {"absorption_mean": pytest.approx(0.3), "probing_k1_accuracy": pytest.approx(0.8)}

    # three members: k=8 absorbs least, k=32 probes best; k=16 is beaten on both by one of them
    members = [{"name": f"m-{k}", "params": {"k": k}, "status": "finished", "error": "", "config": {"arch": "topk"},
                "l0": float(k), "fvu": fvu, "loss_recovered": None, "dead_fraction": 0.0, "source": "eval",
                "frontier": False, "evals": {"absorption_mean": ab, "probing_k1_accuracy": acc}}
               for k, fvu, ab, acc in [(8, 0.4, 0.1, 0.6), (16, 0.3, 0.3, 0.6), (32, 0.2, 0.5, 0.9)]]
    fig = frontier_figure({"sweep": "s", "run": str(tmp_path), "members": members})
    buttons = {b.label: b for b in fig.layout.updatemenus[0].buttons}
    assert set(buttons) == {"absorption_mean", "probing_k1_accuracy"}
    front_x = {m: buttons[m].args[0]["x"][1] for m in buttons}
    assert front_x["absorption_mean"] == [8.0]  # lower is better: absorbing least at the lowest L0 beats both
    assert front_x["probing_k1_accuracy"] == [8.0, 32.0]  # higher is better: k=32 buys accuracy with L0
    assert buttons["probing_k1_accuracy"].args[1] == {"yaxis2.title.text": "probing_k1_accuracy (higher is better)"}


@needs_chromium
def test_browser_frontier_axis_choice(evaluated, page):
    with dashboard_server(evaluated) as url:
        page.set_default_timeout(90_000)
        page.goto(url)
        page.locator(".gtitle", has_text="L0-FVU frontier").wait_for()
        page.locator('[data-testid="stSelectbox"]', has_text="y axis").click()
        page.keyboard.type("absorption_mean")
        page.keyboard.press("Enter")
        page.locator(".gtitle", has_text="L0-absorption_mean frontier").wait_for()
        page.get_by_text("eval metrics per layer").first.wait_for()
