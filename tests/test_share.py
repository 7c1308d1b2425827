"""`strata share`: a static bundle that opens in a browser with no Python and no network, with hostile corpus
text kept as text, written only where Strata may write."""
from __future__ import annotations

import re

import numpy as np
import pytest
from markupsafe import escape
from test_dashboard_pages import assert_no_active_markup
from test_dashboard_support import (
    XSS_PAYLOADS,
    needs_chromium,
    synthetic_run,
)

from strata.cli import main

SPEC = "resid.0:0-31;multi:0,1;cross:2;resid.1:4"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    vocab = [f"tok{i}" for i in range(10)] + XSS_PAYLOADS
    run = synthetic_run(tmp_path_factory.mktemp("share") / "run", vocab)
    assert main(["share", str(run), "--features", SPEC]) == 0
    return run


def pages(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.html"))


RUN_PAGES = "train/synth/"  # one training run, "synth": its pages are under train/synth/


def test_bundle_layout_and_no_network(shared):
    out = shared / "share"
    assert {"index.html", RUN_PAGES + "index.html", RUN_PAGES + "resid.0/31.html", RUN_PAGES + "multi/1.html"} \
        <= set(pages(out))
    assert len(pages(out)) == 2 + 32 + 2 + 1 + 1 + 1  # root and run index, features, flow.html
    for p in out.rglob("*.html"):
        text = p.read_text()
        srcs = re.findall(r'<script[^>]*src="([^"]*)"', text)
        assert srcs and all(s.endswith("assets/plotly.min.js") and "//" not in s for s in srcs), (p, srcs)
        assert "cdn." not in text.lower()
        assert_no_active_markup(re.sub(r"<script.*?</script>", "", text, flags=re.DOTALL))
    assert (out / "assets" / "plotly.min.js").stat().st_size > 1_000_000  # the real library, inlined locally
    # links between shared pages are relative, and only to pages that exist
    for page in ("index.html", RUN_PAGES + "index.html", RUN_PAGES + "resid.0/0.html", RUN_PAGES + "flow.html"):
        hrefs = re.findall(r'href="([^"]+)"', (out / page).read_text())
        assert hrefs
        for href in hrefs:
            assert (out / page).parent.joinpath(href).resolve().is_file(), (page, href)


def test_payloads_in_the_bundle_are_text(shared):
    """Explanations and token strings carry the payloads; the templates escape them (autoescape)."""
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(shared / "index" / "synth.h5")
    index = (shared / "share" / RUN_PAGES / "index.html").read_text()
    expl = [str(e) for e in idx.column("resid.0", "explanation")]
    hostile = next(e for e in expl if "<" in e)
    assert escape(hostile) in index and hostile not in index
    f = next(f for f in range(32) if (idx.feature("resid.0", f)["top_tokens"] >= 10).any())
    page = (shared / "share" / RUN_PAGES / "resid.0" / f"{f}.html").read_text()
    tokens = idx.feature("resid.0", f)["top_tokens"]
    payload = XSS_PAYLOADS[int(tokens[tokens >= 10][0]) - 10]
    assert escape(payload) in page and payload not in page


def test_templates_escape_by_default():
    from dashboard.share import TEMPLATES

    assert TEMPLATES.autoescape is True
    out = TEMPLATES.get_template("index.html").render(
        css="", root="", home="../../index.html", run_name="<b>run</b>", train="t", tokens=1,
        model="<img src=x onerror=alert(1)>", residual_figure="<script>alert(1)</script>", flow=True,
        selection="<script>alert(3)</script>",
        saes=[{"id": "<svg/onload=alert(1)>", "n_latents": 1,
               "rows": [{"feature": 0, "href": "x\" onclick=\"alert(1)", "frequency": 0.5, "max_act": 1.0,
                         "score": 0.5, "explanation": "</table><script>alert(2)</script>"}]}])
    assert_no_active_markup(out.split("</head>")[1])  # <head> holds only the plotly script tag
    out = TEMPLATES.get_template("flow.html").render(
        css="", root="", train="<b>t</b>", causal=True, n_links=1, n_shown=1, figure="",
        nodes=[{"sae": "<svg/onload=alert(1)>", "target": {"href": None, "text": "<img src=x onerror=alert(1)>"},
                "explanation": "</table><script>alert(2)</script>", "density": 0.5}])
    assert_no_active_markup(out.split("</head>")[1])
    out = TEMPLATES.get_template("circuit.html").render(
        css="", root="", train="<b>t</b>", name="<i>g</i>", prompt="<script>alert(3)</script>", n_links=1, figure="",
        supernodes=[{"label": "<svg/onload=alert(1)>", "members": ["<img src=x onerror=alert(1)>"]}],
        pinned=["<script>alert(4)</script>"], max_links=3000,
        nodes=[{"node_id": "<b>1_2_3</b>", "label": "</table><script>alert(2)</script>", "layer": "1", "ctx_idx": 3,
                "influence": 0.5, "href": "x\" onclick=\"alert(1)", "pinned": True}])
    assert_no_active_markup(out.split("</head>")[1])
    out = TEMPLATES.get_template("runs.html").render(
        css="", root="", run_name="<b>run</b>", runs=[
            {"name": "<svg/onload=alert(1)>", "href": "x\" onclick=\"alert(1)", "model": "<b>m</b>", "tokens": 1,
             "explainer": "<script>alert(1)</script>", "selection": "<img src=x onerror=alert(1)>",
             "saes": [{"id": "</td><script>alert(2)</script>", "shared": 1, "n_latents": 2}]}])
    assert_no_active_markup(out.split("</head>")[1])


def test_bad_feature_specs_are_one_line_errors(shared, capsys):
    for spec, message in [("nope:1", "no SAE 'nope'"), ("1-x", "bad feature list"), ("999", "does not exist in"),
                          ("5-2", "runs backwards"), ("resid.0:", "no features listed for resid.0"),
                          ("", "--features is empty"), ("top:0", "top:N")]:
        before = pages(shared / "share")
        assert main(["share", str(shared), "--features", spec]) == 2, spec
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (spec, err)
        assert pages(shared / "share") == before  # the earlier bundle is untouched


def test_rerunning_share_replaces_its_own_bundle(shared, tmp_path):
    out = tmp_path / "bundle"
    assert main(["share", str(shared), "--features", "resid.0:1,2", "--out", str(out)]) == 0
    assert pages(out) == ["index.html", RUN_PAGES + "flow.html", RUN_PAGES + "index.html", RUN_PAGES + "resid.0/1.html",
                          RUN_PAGES + "resid.0/2.html"]
    assert main(["share", str(shared), "--features", "resid.1:7", "--out", str(out)]) == 0
    # the new bundle, whole; nothing of the old one
    assert pages(out) == ["index.html", RUN_PAGES + "flow.html", RUN_PAGES + "index.html", RUN_PAGES + "resid.1/7.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .partial or .old left beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["share", str(shared), "--features", "resid.1:7", "--out", str(empty)]) == 0  # an empty folder is fine
    assert pages(empty) == ["index.html", RUN_PAGES + "flow.html", RUN_PAGES + "index.html", RUN_PAGES + "resid.1/7.html"]


def test_share_into_a_users_folder_is_refused(shared, tmp_path, capsys):
    mine = tmp_path / "my-analysis"
    (mine / "figures").mkdir(parents=True)
    (mine / "notes.md").write_text("what feature 12 does\n")
    (mine / "figures" / "fig1.svg").write_text("<svg/>")
    assert main(["share", str(shared), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and str(mine) in err
    assert (mine / "notes.md").read_text() == "what feature 12 does\n" and (mine / "figures" / "fig1.svg").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-analysis"]  # and no .partial was created


def test_share_onto_a_file_is_refused(shared, tmp_path, capsys):
    target = tmp_path / "report.html"
    target.write_text("<p>my report</p>")
    assert main(["share", str(shared), "--out", str(target)]) == 2
    assert "existing file" in capsys.readouterr().err
    assert target.read_text() == "<p>my report</p>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no report.html.old, no .partial


def test_share_is_refused_while_a_harvest_holds_the_run(shared, capsys):
    from activations.lock import run_lock

    before = pages(shared / "share")
    with run_lock(shared, "strata harvest"):
        assert main(["share", str(shared), "--features", "resid.1:3"]) == 2
    assert "in use by `strata harvest`" in capsys.readouterr().err
    assert pages(shared / "share") == before
    # once the harvest is done, rerunning share replaces its own earlier bundle in RUN/share
    assert main(["share", str(shared), "--features", SPEC]) == 0
    assert pages(shared / "share") == before
    assert sorted(p.name for p in shared.iterdir() if p.name.startswith("share")) == ["share"]


# ---------------------------------------------------------------- every training run, interpretable features first
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A run with two analysed training runs, "second" and "synth"; synth's resid.0 holds planted features."""
    from test_dashboard_pages import PLANTED_VOCAB, plant_features

    run = tmp_path_factory.mktemp("share-two") / "run"
    synthetic_run(run, PLANTED_VOCAB, name="second")
    synthetic_run(run, PLANTED_VOCAB)
    return run, plant_features(run)


def test_share_takes_every_training_run_and_its_index_links_them(two_runs, capsys):
    run, _ = two_runs
    assert main(["share", str(run)]) == 0
    out = run / "share"
    assert capsys.readouterr().out.strip() == f"wrote {out / 'index.html'}"
    index = (out / "index.html").read_text()
    assert re.findall(r'href="([^"]+)"', index) == ["train/second/index.html", "train/synth/index.html"]
    for name in ("second", "synth"):
        run_page = (out / "train" / name / "index.html").read_text()
        assert re.findall(r'<p><a href="([^"]+)">← all training runs', run_page) == ["../../index.html"]
        links = re.findall(r'href="([^"]+\.html)"', run_page)
        assert len(links) > 5 * 25  # best:100 of every SAE: all but the few set aside
        assert all((out / "train" / name).joinpath(h).resolve().is_file() for h in links)
    for page in out.rglob("*.html"):  # every page, however deep, finds the one bundled plotly
        src = re.findall(r'<script[^>]*src="([^"]*)"', page.read_text())
        assert src and page.parent.joinpath(src[0]).resolve() == (out / "assets" / "plotly.min.js").resolve()


def test_default_selection_is_interpretable_features_first(two_runs, tmp_path):
    run, f = two_runs
    assert main(["share", str(run), "--features", "best:5", "--out", str(tmp_path / "b")]) == 0
    folder = tmp_path / "b" / "train" / "synth"
    assert len(list((folder / "resid.0").glob("*.html"))) == 5
    run_page = (folder / "index.html").read_text()
    resid0 = run_page.split("<h2>resid.0 ")[1].split("</table>")[0]
    listed = [int(x) for x in re.findall(r'>#(\d+)</a>', resid0)]
    assert listed[0] == f["good"]  # the planted interpretable feature leads, best first
    assert f["dense"] not in listed and f["outlier"] not in listed
    assert not (folder / "resid.0" / f"{f['outlier']}.html").exists()
    assert "left out: 1 always-on (density above 30%" in run_page and "1 outlier-only (max activation" in run_page
    # top:N is still the densest N: the always-on feature is the densest of resid.0
    assert main(["share", str(run), "--features", "top:1", "--name", "synth", "--out", str(tmp_path / "t")]) == 0
    densest = dense_first(run, "synth")
    assert densest["resid.0"] == f["dense"]
    assert without_flow(tmp_path / "t") == sorted(["index.html", "train/synth/index.html",
                                            *(f"train/synth/{sid}/{j}.html" for sid, j in densest.items())])


def without_flow(folder) -> list[str]:
    """The bundle's pages but the flow page (tested on its own above)."""
    return [p for p in pages(folder) if not p.endswith("/flow.html")]


def dense_first(run, name: str) -> dict[str, int]:
    import numpy as np

    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(run / "index" / f"{name}.h5")
    return {sid: int(np.argmax(idx.column(sid, "frequency"))) for sid in idx.sae_ids}


def test_name_shares_one_training_run(two_runs, tmp_path, capsys):
    run, _ = two_runs
    assert main(["share", str(run), "--name", "second", "--features", "resid.1:2,3", "--out", str(tmp_path / "o")]) == 0
    assert without_flow(tmp_path / "o") == ["index.html", "train/second/index.html", "train/second/resid.1/2.html",
                                     "train/second/resid.1/3.html"]
    assert re.findall(r'href="([^"]+)"', (tmp_path / "o" / "index.html").read_text()) == ["train/second/index.html"]
    assert main(["share", str(run), "--name", "third", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["strata: error: no index for training run 'third'; choose one of second, synth (or leave out "
                   "--name to share every one)"]
    assert not (tmp_path / "x").exists()


@needs_chromium
def test_static_pages_open_in_headless_chromium(shared, page):
    page.goto((shared / "share" / RUN_PAGES / "resid.0" / "0.html").as_uri())
    page.locator(".js-plotly-plot .main-svg").first.wait_for()  # plotly ran from the bundled file
    assert page.title().startswith("resid.0 #0")  # no payload rewrote the title
    assert page.locator(".strata-ctx .tok").count() > 5
    page.get_by_text("← all features").click()
    page.wait_for_url("**/share/train/synth/index.html")
    assert page.locator("table.strata-grid a").count() == 32 + 2 + 1 + 1  # a link per shared feature
    page.get_by_text("← all training runs").click()
    page.wait_for_url("**/share/index.html")
    page.locator("table.strata-grid a", has_text="synth").click()  # the runs page links the run's page
    page.wait_for_url("**/share/train/synth/index.html")


@needs_chromium
def test_payload_pages_stay_inert_in_chromium(shared, page):
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(shared / "index" / "synth.h5")
    hostile = [f for f in range(32) if (idx.feature("resid.0", f)["top_tokens"] >= 10).any()]
    tokens = idx.feature("resid.0", hostile[0])["top_tokens"]
    payload = XSS_PAYLOADS[int(tokens[tokens >= 10][0]) - 10]
    alerts = []
    page.on("dialog", lambda d: (alerts.append(d.message), d.dismiss()))
    page.goto((shared / "share" / RUN_PAGES / "resid.0" / f"{hostile[0]}.html").as_uri())
    contexts = page.locator(".strata-ctx")
    assert contexts.locator("img, svg, script, b, a").count() == 0
    assert payload in contexts.evaluate_all("cs => cs.map(c => c.innerText).join('\\n')")  # shown as text
    for tok in contexts.locator(".tok").filter(has_text="<").all()[:15]:
        tok.hover()  # the onmouseover payloads stay text
    page.goto((shared / "share" / RUN_PAGES / "index.html").as_uri())
    page.locator("table.strata-grid").first.wait_for()
    assert page.locator("table.strata-grid").locator("img, svg, script, b").count() == 0
    assert alerts == [] and not page.title().startswith("pwned")


# ---------------------------------------------------------------- the flow graph and lineage in the bundle
FLOW_SPEC = "resid.0:0-31;resid.1:0-31;resid.2:0-15;multi:0-3"


@pytest.fixture(scope="module")
def shared_causal(tmp_path_factory):
    """A run whose index holds causal matches (matches/<j>), shared with part of resid.2 left out."""
    from test_dashboard_support import add_matches

    run = synthetic_run(tmp_path_factory.mktemp("share-flow") / "run", [f"tok{i}" for i in range(10)] + XSS_PAYLOADS)
    add_matches(run / "index" / "synth.h5")
    assert main(["share", str(run), "--features", FLOW_SPEC]) == 0
    return run


def sankey_of(html_text: str) -> dict:
    import json

    spec = re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', html_text, flags=re.DOTALL)
    return json.loads(spec.group(1))[0]


def test_flow_page_in_the_bundle(shared_causal):
    from sae.analysis.index_file import FeatureIndex

    out = shared_causal / "share" / RUN_PAGES
    assert '<a href="flow.html">' in (out / "index.html").read_text()
    text = (out / "flow.html").read_text()
    trace = sankey_of(text)
    assert trace["type"] == "sankey" and 10 <= len(trace["node"]["label"]) <= 60
    idx = FeatureIndex(shared_causal / "index" / "synth.h5")
    nodes = [(h.split(" #")[0], int(h.split(" #")[1].split("<br>")[0])) for _, h in trace["node"]["customdata"]]
    for (sid, f), (href, _) in zip(nodes, trace["node"]["customdata"]):
        # a node opens its page when that page is in the bundle; resid.2 #16-31 were not shared
        assert href == (f"{sid}/{f}.html" if sid != "resid.2" or f < 16 else "")
        if href:
            assert (out / href).is_file() and f'<a href="{href}">' in text
    assert any(sid == "resid.2" and f >= 16 for sid, f in nodes)  # some node is shown without a page
    best = {m["up"]: idx.match_arrays(m["j"]) for m in idx.matches()}
    for src, dst, value in zip(trace["link"]["source"], trace["link"]["target"], trace["link"]["value"]):
        (up, i), (_, j) = nodes[src], nodes[dst]
        assert best[up]["best_idx"][i] == j and value == pytest.approx(float(best[up]["best_effect"][i]), rel=1e-5)
    assert "re-run <code>strata analyze</code>" not in text


def test_lineage_on_shared_feature_pages(shared_causal):
    from sae.analysis.index_file import FeatureIndex

    out = shared_causal / "share" / RUN_PAGES
    idx = FeatureIndex(shared_causal / "index" / "synth.h5")
    a = idx.match_arrays(0)
    f = int(np.bincount(a["best_idx"][a["best_idx"] >= 0]).argmax())
    lin = idx.lineage("resid.1", f)
    page = (out / "resid.1" / f"{f}.html").read_text()
    assert "<h2>Lineage</h2>" in page
    for direction in ("upstream", "downstream"):
        table = re.search(rf'<table class="strata-grid lineage-{direction}">(.*?)</table>', page, re.DOTALL).group(1)
        assert table.count("<tr>") == 1 + len(lin[direction])
        for e in lin[direction]:
            assert f"{e['effect']:.3f}" in table and f"#{e['feature']}" in table
    for href in re.findall(r'href="([^"]+)"', page):  # every lineage link leads to a shared page
        assert (out / "resid.1").joinpath(href).resolve().is_file(), href
    mass = idx.column("multi", "layer_mass")[2]
    strong = np.nonzero(mass >= 0.1 * mass.max())[0]
    multi = (out / "multi" / "2.html").read_text()
    assert f"born at layer {strong[0]} · peaks at layer {int(np.argmax(mass))} · fades after layer {strong[-1]}" in multi


def test_old_index_bundle_says_how_to_get_causal_matches(shared):
    text = (shared / "share" / RUN_PAGES / "flow.html").read_text()
    assert "activation correlation" in text and "re-run <code>strata analyze</code> for causal matches" in text


@needs_chromium
def test_clicking_a_flow_node_opens_its_page_in_chromium(shared_causal, page):
    page.goto((shared_causal / "share" / RUN_PAGES / "flow.html").as_uri())
    page.locator(".js-plotly-plot .sankey-node").first.wait_for()
    hrefs = page.evaluate("() => document.querySelector('.js-plotly-plot').data[0].node.customdata.map(c => c[0])")
    k = next(k for k, h in enumerate(hrefs) if h)
    page.locator(".js-plotly-plot .sankey-node").nth(k).locator(".node-rect").click()
    page.wait_for_url(f"**/share/{RUN_PAGES}{hrefs[k]}")
    assert page.locator("h2", has_text="Lineage").count() == 1


@pytest.fixture(scope="module")
def heads_bundle(attn_run, tmp_path_factory):
    """A bundle of the busiest feature of an attention-output SAE: (its page, the feature's index record)."""
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(attn_run / "index" / "attn-layer.h5")
    f = int(idx.column("attn_out.1", "count").argmax())
    rec = idx.feature("attn_out.1", f)
    idx.close()
    out = tmp_path_factory.mktemp("heads-share") / "bundle"
    assert main(["share", str(attn_run), "--name", "attn-layer", "--features", f"attn_out.1:{f}", "--out", str(out)]) == 0
    return out / "train" / "attn-layer" / "attn_out.1" / f"{f}.html", rec


def test_bundle_shows_the_heads_panel_of_attention_output_saes(heads_bundle):
    path, rec = heads_bundle
    html = path.read_text()
    assert "<h2>Attention heads</h2>" in html and "<th>bias</th>" in html
    assert html.count("<tr>") >= 1 + min(10, int((rec["top_row"] >= 0).sum()))
    h = int(np.argmax(rec["head_share"][0]))
    assert f"head {h} of layer 1 writes the largest mean share" in html
    assert f"<td>{float(rec['top_head_share'][0][h]):+.2f}</td>" in html


@needs_chromium
def test_bundle_heads_panel_opens_in_chromium(heads_bundle, page):
    """Opened from disk: both figures drawn by the bundled plotly.js, the table of top contexts with the shares."""
    path, rec = heads_bundle
    page.goto(path.as_uri())
    for title in ("mean share of the pre-activation per head (top contexts)", "share per head on each top context"):
        page.locator(".js-plotly-plot .gtitle", has_text=title).wait_for()
    table = page.locator("table.strata-grid").filter(has=page.locator("th", has_text="bias"))
    assert table.locator("tr").count() == 1 + min(10, int((rec["top_row"] >= 0).sum()))
    assert table.locator("tr").nth(1).locator("td").all_inner_texts()[2:] == \
        [f"{float(s):+.2f}" for s in [*rec["top_head_share"][0], rec["top_head_bias_share"][0]]]


@pytest.fixture(scope="module")
def circuit_bundle(analyzed_run, tmp_path_factory):
    """A copy of the analysed tiny run with a saved graph (one supernode, one pinned node) and a bundle sharing its
    features."""
    import shutil

    from test_circuits_page import GRAPH, TRAIN, write_graph_file

    from dashboard.supernodes import save_qparams

    run = tmp_path_factory.mktemp("share-circuit") / "run"
    shutil.copytree(analyzed_run, run, ignore=shutil.ignore_patterns("share", ".locks", ".strata.lock"))
    doc = write_graph_file(run)
    a, b, c = doc["nodes"][-5:-2]
    save_qparams(run, TRAIN, GRAPH, [["colour <then> fox", a["node_id"], c["node_id"]]], [b["node_id"]])
    spec = f"resid.1:{a['feature']},{b['feature']};resid.2:{c['feature']}"
    assert main(["share", str(run), "--name", TRAIN, "--features", spec]) == 0
    return run, doc


def test_a_saved_graph_is_in_the_bundle(circuit_bundle):
    from test_circuits_page import GRAPH, TRAIN

    run, doc = circuit_bundle
    share = run / "share" / "train" / TRAIN
    page = (share / "graphs" / f"{GRAPH}.html").read_text()
    assert f'href="graphs/{GRAPH}.html"' in (share / "index.html").read_text()
    assert '<script src="../../../assets/plotly.min.js"></script>' in page and "https://" not in page.split("<body>")[1]
    assert "colour &lt;then&gt; fox" in page  # the supernode, named in the table (escaped) and boxed in the figure
    c = doc["nodes"][-3]
    assert f'<a href="../resid.2/{c["feature"]}.html">{c["node_id"]}</a>' in page
    rows = page.count("<tr>") + page.count('<tr class="pinned">')
    assert rows == 1 + 1 + 1 + len(doc["nodes"])  # supernode table (head + 1) + node table
    b = doc["nodes"][-4]  # the pinned node: named above the tables and marked in its row
    assert f'<p class="pinned-nodes">pinned: {b["node_id"]}</p>' in page
    assert page.count('<tr class="pinned">') == 1 and \
        f'<tr class="pinned"><td><a href="../resid.1/{b["feature"]}.html">{b["node_id"]}</a></td>' in page


def test_a_dense_graph_in_the_bundle_says_which_links_it_draws(circuit_bundle):
    """The bundle's page of a graph with more links than the figure draws (3,000) says so."""
    from test_circuits_page import TRAIN, write_dense_graph

    from dashboard.share import circuit_page

    run, _ = circuit_bundle
    doc = write_dense_graph(run)
    (run / "graphs" / TRAIN / "dense.json").unlink()  # the bundle of the fixture stays as it was
    page = circuit_page(doc, TRAIN, "dense", {})
    assert "3160 links (the 3000 with the largest share of their target's input drawn)" in page


@needs_chromium
def test_clicking_a_circuit_node_in_the_bundle_opens_its_feature_page(circuit_bundle, page):
    from test_circuits_page import GRAPH, TRAIN

    run, doc = circuit_bundle
    page.goto((run / "share" / "train" / TRAIN / "graphs" / f"{GRAPH}.html").as_uri())
    points = page.locator(".js-plotly-plot .scatterlayer .trace").last.locator(".point")
    points.first.wait_for()
    assert points.count() == len(doc["nodes"])
    assert page.locator(".js-plotly-plot .annotation-text", has_text="colour <then> fox").count() == 1
    # the pinned node is drawn as a red-edged diamond, every other node as a circle
    markers = page.evaluate("() => { const t = document.querySelector('.js-plotly-plot').data"
                            ".find(t => t.name === 'nodes'); return [t.marker.symbol, t.marker.line.color]; }")
    ids0 = page.evaluate("() => document.querySelector('.js-plotly-plot').data.find(t => t.name === 'nodes')"
                         ".customdata.map(c => c[0])")
    b = doc["nodes"][-4]
    k = ids0.index(b["node_id"])
    assert (markers[0][k], markers[1][k]) == ("diamond", "#dc2626")
    assert markers[0].count("diamond") == 1
    assert points.nth(k).get_attribute("d") != points.nth((k + 1) % len(ids0)).get_attribute("d")  # another shape
    ids = page.evaluate("() => document.querySelector('.js-plotly-plot').data.find(t => t.name === 'nodes')"
                        ".customdata.map(c => c[0])")
    c = doc["nodes"][-3]
    points.nth(ids.index(c["node_id"])).click(force=True)
    page.wait_for_url(f"**/share/train/{TRAIN}/resid.2/{c['feature']}.html")
    assert page.locator(".strata-ctx .tok").count() > 0
