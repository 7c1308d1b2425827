"""Every dashboard page rendered with Streamlit's AppTest on a synthetic run, and escaping of hostile corpus text."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_dashboard_support import XSS_PAYLOADS, synthetic_run

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    vocab = [f"tok{i}" for i in range(40)] + XSS_PAYLOADS + [" the", "\n"]
    return synthetic_run(tmp_path_factory.mktemp("dash") / "run", vocab)


def app(run, monkeypatch, read_only=False, **query):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("STRATA_RUN", str(run))
    monkeypatch.setenv("STRATA_READ_ONLY", "1" if read_only else "0")
    at = AppTest.from_file(APP, default_timeout=60)
    for k, v in query.items():
        at.query_params[k] = str(v)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def all_html(at) -> str:
    return "\n".join(m.value for m in at.markdown)


def test_overview_shows_manifest_curves_table_density_frontier(synth, monkeypatch):
    import json

    at = app(synth, monkeypatch)
    assert at.header[0].value == "Overview"
    labels = {m.label: m.value for m in at.metric}
    assert labels["tokens harvested"] == "2,000"
    table = at.dataframe[0].value
    assert {"L0", "FVU", "dead %", "loss recovered", "L0 (index)"} <= set(table.columns)
    assert table.set_index("SAE").loc["resid.1", "FVU"] == pytest.approx(0.21)
    assert table.set_index("SAE").loc["resid.1", "dead %"] == pytest.approx(10.0)
    assert table.set_index("SAE").loc["resid.1", "loss recovered"] == pytest.approx(0.9)
    # L0 measured by the index equals the SAEs' k (TopK with k=4)
    assert table.set_index("SAE").loc["resid.1", "L0 (index)"] == pytest.approx(4.0)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    titles = {s["layout"]["title"]["text"] for s in specs}
    assert {"fvu", "l0", "feature density", "L0-FVU frontier"} <= titles
    fvu = next(s for s in specs if s["layout"]["title"]["text"] == "fvu")  # one curve per SAE, against step
    assert {t["name"] for t in fvu["data"]} == {"resid.0", "resid.1", "resid.2", "multi", "cross"}
    assert list(fvu["data"][0]["x"]) == list(range(10, 110, 10))
    assert at.multiselect(key="metrics-synth").options == ["frac_dead", "fvu", "fvu/resid.0", "fvu/resid.1",
                                                           "fvu/resid.2", "l0", "loss", "lr", "tokens_per_s"]


def test_overview_shows_a_sweep_summary(synth, monkeypatch):
    import json

    folder = synth / "sweeps" / "k-sweep"
    folder.mkdir(parents=True)
    members = [{"name": f"k-sweep-{i}", "params": {"k": k}, "status": "finished", "l0": float(k), "fvu": fvu,
                "loss_recovered": None, "dead_fraction": 0.0, "frontier": front}
               for i, (k, fvu, front) in enumerate([(8, 0.4, True), (16, 0.3, True), (32, 0.35, False)])]
    (folder / "summary.json").write_text(json.dumps({"sweep": "k-sweep", "run": str(synth), "members": members}))
    try:
        at = app(synth, monkeypatch)
        assert any(h.value == "Sweep k-sweep: L0–FVU frontier" for h in at.subheader)
        table = next(d.value for d in at.dataframe if "member" in d.value.columns)
        assert list(table["k"]) == ["8", "16", "32"] and list(table["frontier"]) == [True, True, False]
        spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "L0-FVU" in c.proto.spec)
        frontier = next(t for t in spec["data"] if t.get("name") == "frontier")
        assert list(frontier["x"]) == [8.0, 16.0]  # the k=32 member is dominated
    finally:
        import shutil

        shutil.rmtree(synth / "sweeps")


def test_feature_page_renders_every_index_item(synth, monkeypatch):
    from sae.analysis.index_file import FeatureIndex

    f = int(FeatureIndex(synth / "index" / "synth.h5").feature("resid.0", 0)["best_next_idx"])  # has a previous match
    at = app(synth, monkeypatch, page="features", train="synth", sae="resid.1", f=f)
    assert at.number_input[0].value == f
    page = all_html(at)
    assert page.count('class="tok') > 20  # highlighted tokens of top and interval examples
    assert re.search(r'title="activation [0-9.e+-]+"', page)  # the value on hover
    assert "Nearest features" in page and "?page=features&amp;train=synth&amp;sae=resid.1&amp;f=" in page
    assert "**Lineage**" in page and "sae=resid.2" in page and "sae=resid.0" in page  # matches up and down
    assert any("Explanation (tokens): fires on" in t.value for t in at.text)
    assert any("interval 1" in c.value for c in at.caption)
    specs = " ".join(c.proto.spec for c in at.get("plotly_chart"))
    assert "activations (non-zero)" in specs
    logits = [d.value for d in at.dataframe if "promoted" in d.value.columns]
    assert logits and len(logits[0]) == 5


def test_feature_filters(synth, monkeypatch):
    at = app(synth, monkeypatch, page="features", sae="resid.0")
    n_all = len(at.dataframe[0].value)
    at.text_input(key="q_token").input("tok5").run()
    firing = at.dataframe[0].value
    assert 0 < len(firing) < n_all
    at.text_input(key="q_token").input("").run()
    at.selectbox(key="q_sort").select("density (low first)").run()
    freq = at.dataframe[0].value["frequency"].to_numpy()
    assert (freq[1:] >= freq[:-1]).all()
    at.text_input(key="q_text").input("no-such-explanation-xyz").run()
    assert len(at.dataframe[0].value) == 0


def test_multilayer_and_crosscoder_feature_pages(synth, monkeypatch):
    at = app(synth, monkeypatch, page="features", sae="multi", f=0)
    labels = [m.label for m in at.metric]
    assert "mean layer" in labels and "layers active" in labels
    assert re.search(r"@ layer \d", all_html(at))
    at = app(synth, monkeypatch, page="features", sae="cross", f=1)
    assert "decoder norm per layer" in " ".join(c.proto.spec for c in at.get("plotly_chart"))


def test_flow_page(synth, monkeypatch):
    at = app(synth, monkeypatch, page="flow")
    specs = " ".join(c.proto.spec for c in at.get("plotly_chart"))
    assert "features x layers" in specs and "flow of features through depth" in specs and "residual stream" in specs
    assert "sae=resid.2" in all_html(at)  # the node table links into the deepest SAE


def test_prompt_explorer_off_when_read_only(synth, monkeypatch):
    at = app(synth, monkeypatch, read_only=True, page="prompt")
    assert any("switched off in read-only mode" in i.value for i in at.info)
    assert not at.button


def test_bad_query_values_stay_inside_the_run(synth, monkeypatch):
    at = app(synth, monkeypatch, page="features", train="../../etc", sae="../x", f="3")
    assert at.selectbox(key="train").value == "synth"
    assert at.number_input[0].value == 3


@pytest.mark.parametrize("bad", ["999999", "32", "-1", "abc", "2.5", "\u00b2"])
def test_a_link_to_a_feature_that_does_not_exist_says_so(synth, monkeypatch, bad):
    """?f= names a feature the SAE lacks: the page says which value is wrong and what range is valid, and shows
    no other feature in its place."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("STRATA_RUN", str(synth))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(page="features", train="synth", sae="resid.1", f=bad)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] == [(f"This link asks for feature ` f={bad} `, which resid.1 does not have: its "
                                           "features are 0-31. Type one above or pick a row in the table.")]
    assert "class=\"tok" not in all_html(at) and not any("· feature" in h.value for h in at.subheader)
    assert at.number_input[0].value is None
    at.number_input[0].set_value(7).run()  # typing a valid one opens it and puts it in the link
    assert not at.error and any(h.value == "resid.1 · feature 7" for h in at.subheader)
    assert at.query_params["f"] == "7"


def test_switching_sae_does_not_carry_a_feature_number_over(synth, monkeypatch):
    at = app(synth, monkeypatch, page="features", train="synth", sae="resid.1", f=5)
    at.selectbox(key="sae").select("resid.2").run()
    first = int(at.dataframe[0].value.iloc[0]["feature"])  # the strongest feature of resid.2, not resid.1's #5
    assert not at.error and at.query_params["sae"] == "resid.2" and at.query_params["f"] == str(first)
    assert any(h.value == f"resid.2 · feature {first}" for h in at.subheader)


def test_symlinks_out_of_the_run_are_not_followed(synth, tmp_path, monkeypatch):
    import shutil

    from dashboard import data

    outside = tmp_path / "outside"
    shutil.copytree(synth / "train" / "synth", outside / "elsewhere")
    link = synth / "train" / "escape"
    link.symlink_to(outside / "elsewhere", target_is_directory=True)
    try:
        assert "escape" not in data.train_names(synth)
        with pytest.raises(Exception, match="outside the run directory"):
            data.inside(synth, link / "metrics.jsonl")
        app(synth, monkeypatch, train="escape")  # the overview still renders, without the escaped folder
    finally:
        link.unlink()


def test_corpus_payloads_are_escaped_everywhere(synth, monkeypatch):
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(synth / "index" / "synth.h5")
    hostile = [f for f in range(32) if any(t >= 40 and t < 40 + len(XSS_PAYLOADS)
                                          for t in idx.feature("resid.0", f)["top_tokens"].flatten())]
    assert hostile, "the synthetic corpus must put payload tokens in some contexts"
    at = app(synth, monkeypatch, page="features", sae="resid.0", f=hostile[0])
    page = all_html(at)
    assert "&lt;" in page  # payloads are there, escaped
    assert_no_active_markup(page)


class TagCollector:
    """Every tag and attribute a browser would build from an HTML string."""

    def __init__(self, text: str):
        from html.parser import HTMLParser

        self.tags: list[tuple[str, dict]] = []
        parser = HTMLParser(convert_charrefs=True)
        parser.handle_starttag = lambda tag, attrs: self.tags.append((tag, dict(attrs)))
        parser.feed(text)
        parser.close()


def assert_no_active_markup(page: str) -> None:
    """Payload text must stay text: no script/img/svg/b element, no on* attribute, no javascript: link."""
    tags = TagCollector(page).tags
    names = {t for t, _ in tags}
    assert not names & {"script", "img", "svg", "b", "iframe"}, names
    for tag, attrs in tags:
        assert not any(k.lower().startswith("on") for k in attrs), (tag, attrs)
        assert not str(attrs.get("href", "")).lower().startswith("javascript"), (tag, attrs)


# ---------------------------------------------------------------- the real chain (tiny Llama -> ... -> analyze)
def test_every_page_on_a_real_analysed_run(analyzed_run, monkeypatch):
    import json

    at = app(analyzed_run, monkeypatch)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    fvu = [s for s in specs if s["layout"]["title"]["text"] == "fvu"]
    assert fvu and {t["name"] for t in fvu[0]["data"]} == {"resid.0", "resid.1", "resid.2", "resid.3"}
    table = at.dataframe[0].value
    assert set(table["SAE"]) == {"resid.0", "resid.1", "resid.2", "resid.3"}
    assert table["L0 (index)"].iloc[0] == pytest.approx(4.0, abs=0.5)
    at = app(analyzed_run, monkeypatch, page="features", train="topk-layer", sae="resid.2", f=0)
    assert all_html(at).count('class="tok') > 10
    at = app(analyzed_run, monkeypatch, page="flow", train="topk-layer")
    assert '"type":"sankey"' in " ".join(c.proto.spec for c in at.get("plotly_chart"))
    at = app(analyzed_run, monkeypatch, page="flow", train="topk-multilayer")
    assert "features x layers" in " ".join(c.proto.spec for c in at.get("plotly_chart"))


def test_prompt_explorer_runs_the_model_and_links_features(analyzed_run, monkeypatch):
    at = app(analyzed_run, monkeypatch, page="prompt", train="topk-multilayer")
    at.text_area(key="prompt_text").input("def main():\n    return <b>1</b>")
    at.button(key="prompt_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    grid = next(m.value for m in at.markdown if "strata-grid" in m.value)
    assert grid.count("<tr>") == 1 + 4 + 4  # tokens across; a lens row and an SAE row per layer resid.0-3
    assert "?page=features&amp;train=topk-multilayer" in grid
    assert "@ resid.0" in grid and "@ resid.3" in grid  # one row per layer of the multi-layer SAE
    assert "&lt;" in grid  # the typed text is shown, escaped
    assert_no_active_markup(grid)
    rows = at.dataframe[0].value
    assert len(rows) > 0 and set(rows.columns) == {"layer", "feature", "activation", "explanation"}


# ---------------------------------------------------------------- attention-output SAEs (heads)
def plotly_values(v) -> np.ndarray:
    """A plotly JSON array: a plain list, or plotly's typed-array form {dtype, bdata (base64), shape}."""
    import base64

    if isinstance(v, dict):
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(x) for x in str(v["shape"]).split(",")]) if "shape" in v else a
    return np.array(v, dtype=float)


def test_feature_page_shows_which_heads_write_the_feature(attn_run, synth, monkeypatch):
    import json

    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(attn_run / "index" / "attn-layer.h5")
    f = int(idx.column("attn_out.1", "count").argmax())
    rec = idx.feature("attn_out.1", f)
    at = app(attn_run, monkeypatch, page="features", train="attn-layer", sae="attn_out.1", f=f)
    specs = {s["layout"]["title"]["text"]: s for s in (json.loads(c.proto.spec) for c in at.get("plotly_chart"))}
    bars = specs["mean share of the pre-activation per head (top contexts)"]["data"]
    assert len(bars) == 1 and list(bars[0]["x"]) == ["h0", "h1", "h2", "h3", "bias"]
    np.testing.assert_allclose(plotly_values(bars[0]["y"]), [*rec["head_share"][0], rec["head_bias_share"][0]],
                               rtol=1e-5)
    heat = specs["share per head on each top context"]["data"][0]
    ok = rec["top_row"] >= 0
    np.testing.assert_allclose(plotly_values(heat["z"]), np.c_[rec["top_head_share"][ok], rec["top_head_bias_share"][ok]],
                               rtol=1e-5)
    assert list(heat["y"])[0] == f"#1 · {float(rec['top_value'][0]):.3g}"
    h = int(np.argmax(rec["head_share"][0]))
    assert any(c.value.startswith(f"head {h} of layer 1 writes the largest mean share") for c in at.caption)
    table = next(m.value for m in at.markdown if "<th>bias</th>" in m.value)
    assert table.count("<tr>") == 1 + min(10, int(ok.sum())) and table.count('class="tok') > 10
    assert f"{float(rec['top_head_share'][0][h]):+.2f}" in table
    # the multi-layer SAE's page: one group of bars per layer the feature has top contexts at
    multi = FeatureIndex(attn_run / "index" / "attn-multi.h5").feature("multilayer", f)
    at = app(attn_run, monkeypatch, page="features", train="attn-multi", sae="multilayer", f=f)
    bars = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "mean share of" in c.proto.spec)["data"]
    assert [b["name"] for b in bars] == [f"layer {layer} ({n} contexts)" for layer, n in
                                         enumerate(multi["head_contexts"]) if n > 0]
    # an SAE that does not read attention outputs has no heads panel
    at = app(synth, monkeypatch, page="features", train="synth", sae="resid.0", f=0)
    assert "Attention heads" not in all_html(at) and "mean share of" not in str(at.get("plotly_chart"))
    idx.close()


def test_heads_page_summarises_heads_x_features_per_layer(attn_run, synth, monkeypatch):
    import json

    from sae.analysis.index_file import FeatureIndex

    at = app(attn_run, monkeypatch, page="heads", train="attn-layer")
    assert [s.value for s in at.subheader] == [f"attn_out.{i} · attn_out.{i}: heads x features" for i in range(3)]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    heat = next(s for s in specs if s["layout"]["title"]["text"].startswith("attn_out.2: features by the head"))
    idx = FeatureIndex(attn_run / "index" / "attn-layer.h5")
    share = idx.column("attn_out.2", "head_share")[:, 0]
    shown = [int(y) for y in heat["data"][0]["y"]]
    assert set(shown) == set(np.nonzero(idx.column("attn_out.2", "head_contexts")[:, 0] > 0)[0])
    np.testing.assert_allclose(plotly_values(heat["data"][0]["z"]), share[shown], rtol=1e-5)
    main = np.argmax(share[shown], axis=1)
    assert (np.diff(main) >= 0).all()  # grouped by the head that writes most of each feature
    counts = next(s for s in specs if s["layout"]["title"]["text"] == "attn_out.2: features each head writes most")
    np.testing.assert_array_equal(plotly_values(counts["data"][0]["y"]), np.bincount(main, minlength=4))
    best = int(np.nanargmax(share[:, 0]))
    assert f'sae=attn_out.2&amp;f={best}"' in all_html(at)  # head 0's strongest feature links to its page
    # the multi-layer SAE: one summary per layer it reads
    at = app(attn_run, monkeypatch, page="heads", train="attn-multi")
    assert len(at.subheader) == 3
    # a run without attention-output SAEs says how to get them
    at = app(synth, monkeypatch, page="heads")
    assert any("--sites attn_out" in i.value for i in at.info)
    idx.close()


# ---------------------------------------------------------------- first impression: the default order
PLANTED_VOCAB = [f"tok{i}" for i in range(40)] + ["\n"]


def plant_features(run, sid: str = "resid.0", name: str = "synth") -> dict[str, int]:
    """Into a synthetic run's index (vocabulary PLANTED_VOCAB), plant in SAE `sid`: an interpretable feature
    (good score, ordinary statistics), an always-on one and an outlier-only one that both score higher, a
    formatting one (peaks on '\\n') and a repeat of the interpretable one's explanation; every other score is
    at most 0.5. Returns their indices."""
    import h5py
    import numpy as np

    from sae.analysis.index_file import FeatureIndex

    path = run / "index" / f"{name}.h5"
    idx = FeatureIndex(path)
    mean = idx.column(sid, "mean_act")
    idx.close()
    planted = {"good": 3, "dense": 4, "outlier": 5, "newline": 6, "repeat": 7}
    with h5py.File(path, "r+") as f:
        g = f[f"saes/{sid}"]
        score = np.minimum(g["explanation_score"][()], 0.5)
        score[list(planted.values())] = [0.9, 0.99, 0.98, 0.97, 0.85]
        g["explanation_score"][...] = score
        g["frequency"][planted["dense"]] = 0.6
        g["max_act"][planted["outlier"]] = 40 * mean[planted["outlier"]]
        tokens = g["top_tokens"][planted["newline"]]
        tokens[:, tokens.shape[1] // 2] = PLANTED_VOCAB.index("\n")  # every top context peaks on '\n'
        g["top_tokens"][planted["newline"]] = tokens
        g["explanation"][planted["repeat"]] = g["explanation"][planted["good"]]
    return planted


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    run = synthetic_run(tmp_path_factory.mktemp("planted") / "run", PLANTED_VOCAB)
    return run, plant_features(run)


def test_default_sort_puts_interpretable_features_first(planted, monkeypatch):
    import numpy as np

    run, f = planted
    at = app(run, monkeypatch, page="features", train="synth", sae="resid.0")
    assert at.selectbox(key="q_sort").value == "interpretable first"
    table = at.dataframe[0].value
    order = list(table["feature"])
    # the planted interpretable feature opens the list (and its page), ahead of higher-scored always-on and
    # outlier-only ones, which are set aside and said so
    assert order[0] == f["good"] and at.number_input[0].value == f["good"]
    assert f["dense"] not in order and f["outlier"] not in order and len(order) == 30
    caption = next(c.value for c in at.caption if c.value.startswith("Set aside"))
    assert "1 always-on (density above 30%" in caption and "1 outlier-only (max activation at least 10x" in caption
    # the formatting feature and the repeated explanation come after every other feature
    assert order[-2:] == [f["newline"], f["repeat"]]  # (by score among themselves: 0.97, 0.85)
    scores = table.set_index("feature").loc[order[:-2], "score"].to_numpy()
    assert (np.diff(scores) <= 0).all()  # best first
    # the toggle brings them back, flagged; sorted by max activation the outlier-only one is first
    at.toggle(key="q_flagged").set_value(True).run()
    table = at.dataframe[0].value.set_index("feature")
    assert table.loc[f["dense"], "flag"] == "always-on" and table.loc[f["outlier"], "flag"] == "outlier-only"
    at.selectbox(key="q_sort").select("max activation").run()
    assert int(at.dataframe[0].value.iloc[0]["feature"]) == f["outlier"]
