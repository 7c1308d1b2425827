"""The dashboard served by `streamlit run` (as `strata dashboard` does), opened in headless Chromium through
Playwright (pytest-playwright's `page`, driving Debian's chromium)."""
from __future__ import annotations

from urllib.parse import quote

import pytest
from playwright.sync_api import expect
from test_dashboard_support import (
    XSS_PAYLOADS,
    add_matches,
    dashboard_server,
    free_port,
    needs_chromium,
    synthetic_run,
)

pytestmark = needs_chromium
LOAD_MS = 90_000  # a cold Streamlit session on a busy 2-core machine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    vocab = [f"word{i}" for i in range(30)] + XSS_PAYLOADS
    run = synthetic_run(tmp_path_factory.mktemp("browser") / "run", vocab)
    add_matches(run / "index" / "synth.h5")  # causal matches, for the Flow page and lineage panels
    with dashboard_server(run) as url:
        yield run, url


def open_feature(page, url: str):
    """Open a feature page and wait until Streamlit has rendered its token contexts; the alerts any script on
    the page raises are collected in the returned list."""
    alerts = []
    page.on("dialog", lambda d: (alerts.append(d.message), d.dismiss()))
    page.set_default_timeout(LOAD_MS)
    page.goto(url)
    page.locator(".strata-ctx .tok").first.wait_for()
    return alerts


def alpha(css_colour: str) -> float:
    """The alpha of a computed CSS colour: rgba(r, g, b, a), or rgb(r, g, b) (opaque)."""
    parts = css_colour[css_colour.index("(") + 1:-1].split(",")
    return float(parts[3]) if len(parts) == 4 else 1.0


def test_feature_page_shows_highlighted_tokens(served, page):
    run, url = served
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(run / "index" / "synth.h5")
    f = int(idx.column("resid.1", "max_act").argmax())
    rec = idx.feature("resid.1", f)
    open_feature(page, f"{url}/?page=features&train=synth&sae=resid.1&f={f}")
    assert page.get_by_text(f"resid.1 · feature {f}").is_visible()
    tokens = page.locator(".strata-ctx .tok")
    peaks = page.locator(".strata-ctx .tok.peak")
    assert peaks.count() >= int((rec["top_row"] >= 0).sum())  # one peak per top example (and interval sample)
    # every token carries its value for the hover tooltip; a token is shaded exactly where the feature fires
    shown = tokens.evaluate_all("ts => ts.map(t => [t.title, t.dataset.act, getComputedStyle(t).backgroundColor])")
    assert len(shown) > 20
    for title, act, colour in shown:
        assert title == f"activation {act}"
        if float(act) == 0:
            assert alpha(colour) == 0, (act, colour)
        elif float(act) > 0.01 * float(rec["max_act"]):
            assert alpha(colour) > 0, (act, colour)
    # hovering the strongest example's peak: the token under the mouse names the feature's top activation
    page.locator(".strata-ctx").first.locator(".tok.peak").hover()
    title, act = page.evaluate("() => { const e = document.querySelector('.strata-ctx .tok:hover');"
                               " return e ? [e.title, e.dataset.act] : [null, null]; }")
    assert title == f"activation {act}"
    assert float(act) == pytest.approx(float(rec["top_acts"].max()), rel=1e-3)
    assert not page.title().startswith("pwned")


def test_hostile_tokens_render_as_text_in_the_live_app(served, page):
    run, url = served
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(run / "index" / "synth.h5")
    f = next(f for f in range(32) if (idx.feature("resid.0", f)["top_tokens"] >= 30).any())
    tokens = idx.feature("resid.0", f)["top_tokens"]
    payloads = {XSS_PAYLOADS[int(t) - 30] for t in tokens[tokens >= 30]}
    alerts = open_feature(page, f"{url}/?page=features&train=synth&sae=resid.0&f={f}")
    contexts = page.locator(".strata-ctx")
    assert contexts.locator("img, svg, script, b, a, iframe").count() == 0
    text = contexts.evaluate_all("cs => cs.map(c => c.innerText).join('\\n')")
    assert all(p in text for p in payloads), payloads  # shown, character for character, as text
    hostile = page.locator(".strata-ctx .tok").filter(has_text="<")
    for i in range(min(hostile.count(), 15)):  # hovering them runs nothing (the onmouseover payloads)
        hostile.nth(i).hover()
    assert alerts == [] and not page.title().startswith("pwned")


def test_real_run_feature_page_in_chromium(analyzed_run, page):
    """The README's flow: `strata dashboard RUN` on an analysed run, the feature page opened in a browser."""
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(analyzed_run / "index" / "topk-layer.h5")
    f = int(idx.column("resid.2", "count").argmax())
    with dashboard_server(analyzed_run, read_only=False) as url:
        open_feature(page, f"{url}/?page=features&train=topk-layer&sae=resid.2&f={f}")
        tokens = page.locator(".strata-ctx .tok")
        assert tokens.count() > 20 and page.locator(".strata-ctx .tok.peak").count() >= 1
        assert all(t.startswith("activation ") for t in tokens.evaluate_all("ts => ts.map(t => t.title)"))


def test_a_bad_feature_link_is_named_as_typed(served, page):
    """?f= is shown back in the error exactly as written, never as markup: this one cannot become a link."""
    _, url = served
    bad = "[open](https://evil.example)"
    page.set_default_timeout(LOAD_MS)
    page.goto(f"{url}/?page=features&train=synth&sae=resid.1&f={quote(bad)}")
    alert = page.get_by_role("alert").filter(has_text="This link asks for feature")
    alert.wait_for()
    assert f"feature f={bad}, which resid.1 does not have: its features are 0-31" in alert.inner_text()
    assert page.locator("a[href*='evil.example']").count() == 0
    assert page.locator(".strata-ctx").count() == 0  # and no other feature is shown in its place


def test_flow_graph_opens_feature_pages_and_lineage_leads_back(served, page):
    """A researcher opens the Flow page, clicks a feature under the graph, reads its lineage, and follows the
    lineage's link back to the flow of that one feature."""
    _, url = served
    page.set_default_timeout(LOAD_MS)
    page.goto(f"{url}/?page=flow&train=synth")
    page.locator(".js-plotly-plot .sankey-node").first.wait_for()
    assert 10 <= page.locator(".js-plotly-plot .sankey-node").count() <= 60
    link = page.locator("table.strata-grid a").nth(3)
    query = dict(p.split("=") for p in link.get_attribute("href").lstrip("?").split("&"))
    link.click()
    page.get_by_text(f"{query['sae']} · feature {query['f']}").wait_for()
    page.locator(".strata-ctx .tok").first.wait_for()
    page.get_by_text("Lineage", exact=True).wait_for()
    page.locator("table.strata-grid th", has_text="causal effect").first.wait_for()  # its matches, as a table
    page.get_by_text("show this feature's links in the Flow view").click()
    page.locator(".js-plotly-plot .sankey-node").first.wait_for()
    expect(page.get_by_role("textbox", name="start at feature")).to_have_value(f"{query['sae']}:{query['f']}")
    labels = page.locator(".js-plotly-plot .sankey-node .node-label").evaluate_all("ns => ns.map(n => n.textContent)")
    assert any(t.startswith(f"#{query['f']} ") for t in labels)


def test_flow_filter_with_regex_characters_is_plain_text(served, page):
    _, url = served
    page.set_default_timeout(LOAD_MS)
    page.goto(f"{url}/?page=flow&train=synth")
    page.locator(".js-plotly-plot .sankey-node").first.wait_for()
    box = page.get_by_role("textbox", name="explanation contains")
    box.fill("(*")
    box.press("Enter")
    page.get_by_text("No links touch explanations containing").wait_for()
    expect(page.locator(".js-plotly-plot .sankey-node")).to_have_count(0)  # once the rerun has finished
    assert page.locator("[data-testid='stException']").count() == 0
def test_heads_panel_and_heads_page_in_chromium(attn_run, page):
    """An attention-output SAE's feature page shows which heads write it, and the Heads page its heads x features
    heatmap per layer, in a real browser."""
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(attn_run / "index" / "attn-layer.h5")
    f = int(idx.column("attn_out.1", "count").argmax())
    rec = idx.feature("attn_out.1", f)
    try:
        with dashboard_server(attn_run) as url:
            open_feature(page, f"{url}/?page=features&train=attn-layer&sae=attn_out.1&f={f}")
            page.get_by_text("Attention heads").first.wait_for()
            table = page.locator("table.strata-grid").filter(has=page.locator("th", has_text="bias"))
            assert table.locator("th").all_inner_texts()[2:] == ["h0", "h1", "h2", "h3", "bias"]
            first = table.locator("tr").nth(1).locator("td").all_inner_texts()
            assert first[2:] == [f"{float(s):+.2f}" for s in [*rec["top_head_share"][0], rec["top_head_bias_share"][0]]]
            assert table.locator(".strata-ctx .tok.peak").count() >= 1  # the context's tokens, highlighted
            for title in ("mean share of the pre-activation per head (top contexts)", "share per head on each top context"):
                page.locator(".js-plotly-plot .gtitle", has_text=title).wait_for()  # drawn by plotly.js
            page.goto(f"{url}/?page=heads&train=attn-layer")
            page.get_by_text("attn_out.2 · attn_out.2: heads x features").wait_for()
            page.locator(".js-plotly-plot .heatmaplayer").first.wait_for()
            assert page.locator(".js-plotly-plot").count() == 6  # a heatmap and a bar chart per layer
    finally:
        idx.close()


# ---------------------------------------------------------------- prompt explorer and first impression
@pytest.fixture(scope="module")
def explorer_server(analyzed_run):
    """`strata dashboard` (not read-only: the prompt explorer runs the tiny Llama) on the analysed tiny run."""
    with dashboard_server(analyzed_run, read_only=False) as url:
        yield analyzed_run, url


def run_prompt(page, url: str, train: str, text: str):
    page.set_default_timeout(LOAD_MS)
    page.goto(f"{url}/?page=prompt&train={train}")
    box = page.get_by_label("text")
    box.fill(text)
    box.press("Control+Enter")  # Streamlit takes a text area's value on Ctrl+Enter (or blur)
    page.get_by_role("button", name="Run").click()
    page.locator(".strata-prompt .strata-lens").first.wait_for()


def test_prompt_explorer_in_chromium(explorer_server, page):
    """Greyed sink position with its reason on hover, explanations on hover over feature chips, and a logit lens
    row equal to the model's own final norm and head applied to that layer's residual."""
    from test_prompt_explorer import TEXT, direct, lens_direct

    from activations.model import load_model
    from sae.analysis.index_file import FeatureIndex

    run, url = explorer_server
    run_prompt(page, url, "topk-layer", TEXT)
    heads = page.locator(".strata-prompt th .tok")
    shown = heads.evaluate_all("ts => ts.map(t => [t.className, t.title, getComputedStyle(t).backgroundColor])")
    assert shown[0][0] == "tok strata-untrained" and "never trained here" in shown[0][1]
    assert shown[0][2] == "rgb(229, 231, 235)"  # grey
    assert all(cls == "tok" and alpha(bg) == 0 for cls, _, bg in shown[1:])
    assert page.get_by_text("Grey positions 0-0 were left out of training").is_visible()
    # hovering a feature chip shows its explanation from the index
    expl = FeatureIndex(run / "index" / "topk-layer.h5").column("resid.2", "explanation")
    row = page.locator(".strata-prompt tr", has=page.locator(".strata-sae-row", has_text="resid.2"))
    assert row.locator(".strata-untrained").count() == 1  # the sink cell: grey, no features
    chip = row.locator("a.strata-chip").first
    chip.hover()
    title = page.evaluate("() => document.querySelector('a.strata-chip:hover').title")
    f = int(chip.inner_text())
    assert title.startswith(f"resid.2 #{f} (activation ") and title.endswith(expl[f])
    # the logit lens row of resid.2: the top prediction at every position, as computed directly
    import json

    lm = load_model(json.loads((run / "manifest.json").read_text())["model"]["id"], device="cpu")
    _, hidden, _ = direct(lm, TEXT)
    want = lens_direct(lm, hidden[2]).argmax(-1).tolist()
    lens = page.locator(".strata-prompt tr", has=page.locator(".strata-lens-row", has_text="lens resid.2"))
    ids = lens.locator(".strata-lens").evaluate_all("cs => cs.map(c => Number(c.dataset.ids.split(',')[0]))")
    assert ids == want
    lens.locator(".strata-lens").nth(1).hover()  # its top predictions with probabilities on hover
    assert page.evaluate("() => document.querySelector('.strata-lens:hover').title").startswith(
        "resid.2 at position 1 predicts: ")
    # one feature across depth: its chart is drawn
    page.get_by_text("One feature across depth").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()


def test_features_page_opens_on_an_interpretable_feature_in_chromium(tmp_path_factory, page):
    from test_dashboard_pages import PLANTED_VOCAB, plant_features

    run = synthetic_run(tmp_path_factory.mktemp("browser-planted") / "run", PLANTED_VOCAB)
    planted = plant_features(run)
    with dashboard_server(run) as url:
        open_feature(page, f"{url}/?page=features&train=synth&sae=resid.0")
        assert page.get_by_text(f"resid.0 · feature {planted['good']}").is_visible()  # the first listed
        aside = page.get_by_text("Set aside (the toggle shows them")
        assert aside.is_visible() and "1 outlier-only" in aside.inner_text()
        page.get_by_text("show always-on and outlier-only features (2)").click()
        aside.wait_for(state="detached")


def test_circuits_page_click_a_node_and_intervene_in_chromium(analyzed_run, tmp_path, page):
    """A researcher opens a saved graph on the Circuits page, clicks a feature node to see its strongest links and
    its feature page's link, then zeroes that feature and reads the change of the top logits."""
    import json
    import shutil

    from test_circuits_page import GRAPH, TRAIN, write_graph_file

    from activations import layout
    from dashboard.serve import serve_dashboard, wait_until_up

    run = tmp_path / "run"
    shutil.copytree(analyzed_run, run, ignore=shutil.ignore_patterns("share", ".locks", ".strata.lock"))
    doc = write_graph_file(run)
    target = doc["nodes"][-3]  # "says fox": resid.2's feature at the last position
    port = free_port()
    proc = serve_dashboard(run, port=port, host="127.0.0.1", block=False)
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}", proc, timeout=90)
        page.set_default_timeout(LOAD_MS)
        page.goto(f"http://127.0.0.1:{port}/?page=circuits&graph={TRAIN}/{GRAPH}")
        points = page.locator(".js-plotly-plot .scatterlayer .trace").last.locator(".point")
        points.first.wait_for()
        assert points.count() == len(doc["nodes"])
        labels = page.locator(".js-plotly-plot .scatterlayer .textpoint").evaluate_all("ns => ns.map(n => n.textContent)")
        assert "says fox" in labels and "<b>brown</b> & colours" in labels  # the explanation, as text
        xs = page.evaluate("() => document.querySelector('.js-plotly-plot').data.find(t => t.name === 'nodes')"
                           ".customdata.map(c => c[0])")
        points.nth(xs.index(target["node_id"])).click(force=True)
        link = page.get_by_role("link", name=f"open feature resid.2 #{target['feature']}")
        link.wait_for()
        assert link.get_attribute("href") == f"?page=features&train={TRAIN}&sae=resid.2&f={target['feature']}"
        page.get_by_text("strongest inputs").wait_for()
        edit = page.get_by_role("textbox", name="features to edit")
        expect(edit).to_have_value(f"resid.2:{target['feature']}@{target['ctx_idx']}*0")
        page.get_by_role("button", name="Run intervention").click()
        table = page.locator("table.strata-grid").filter(has=page.locator("th", has_text="p edited"))
        table.wait_for()
        assert table.locator("tr").count() == 11  # the ten largest logit changes
        assert json.loads(layout.graph_path(run, TRAIN, GRAPH).read_text()) == doc  # looking and intervening write nothing
    finally:
        proc.terminate()
        proc.wait(timeout=20)



def test_circuits_page_pin_a_node_in_chromium(analyzed_run, tmp_path, page):
    """A researcher clicks a weak node, pins it: the graph file's qParams.pinnedIds holds it (nothing else in the
    file changes) and the node is redrawn as a red-edged diamond; unpinning takes it back out."""
    import json
    import shutil
    import time

    from test_circuits_page import GRAPH, TRAIN, write_graph_file

    from activations import layout
    from dashboard.serve import serve_dashboard, wait_until_up

    run = tmp_path / "run"
    shutil.copytree(analyzed_run, run, ignore=shutil.ignore_patterns("share", ".locks", ".strata.lock"))
    doc = write_graph_file(run)
    path = layout.graph_path(run, TRAIN, GRAPH)
    target = doc["nodes"][-4]  # resid.1's feature at the last position, the least influential
    port = free_port()
    proc = serve_dashboard(run, port=port, host="127.0.0.1", block=False)

    def node_marker():
        return page.evaluate("(id) => { const t = document.querySelector('.js-plotly-plot').data"
                             ".find(t => t.name === 'nodes'); const k = t.customdata.findIndex(c => c[0] === id);"
                             " return [t.marker.symbol[k], t.marker.line.color[k]]; }", target["node_id"])

    def file_pins(want, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            pins = json.loads(path.read_text())["qParams"]["pinnedIds"]
            if pins == want:
                return pins
            time.sleep(0.5)
        return json.loads(path.read_text())["qParams"]["pinnedIds"]

    try:
        assert wait_until_up(f"http://127.0.0.1:{port}", proc, timeout=90)
        page.set_default_timeout(LOAD_MS)
        page.goto(f"http://127.0.0.1:{port}/?page=circuits&graph={TRAIN}/{GRAPH}")
        points = page.locator(".js-plotly-plot .scatterlayer .trace").last.locator(".point")
        points.first.wait_for()
        assert node_marker() == ["circle", "#1e293b"]
        ids = page.evaluate("() => document.querySelector('.js-plotly-plot').data.find(t => t.name === 'nodes')"
                            ".customdata.map(c => c[0])")
        points.nth(ids.index(target["node_id"])).click(force=True)
        page.get_by_role("button", name="Pin node").click()
        assert file_pins([target["node_id"]]) == [target["node_id"]]
        page.get_by_role("button", name="Unpin node").wait_for()
        page.wait_for_function("(id) => { const t = document.querySelector('.js-plotly-plot').data"
                               ".find(t => t.name === 'nodes'); const k = t.customdata.findIndex(c => c[0] === id);"
                               " return k >= 0 && t.marker.symbol[k] === 'diamond'; }", arg=target["node_id"])
        assert node_marker() == ["diamond", "#dc2626"]
        after = json.loads(path.read_text())
        assert {k: v for k, v in after.items() if k != "qParams"} == {k: v for k, v in doc.items() if k != "qParams"}
        page.get_by_role("button", name="Unpin node").click()
        assert file_pins([]) == []
        page.get_by_role("button", name="Pin node").wait_for()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_circuits_page_draws_a_dense_graph_capped_in_chromium(analyzed_run, tmp_path, page):
    """A graph with more links than the page draws (3,160): every node is shown, 3,000 links are drawn, and the
    caption says which."""
    import shutil

    from test_circuits_page import TRAIN, write_dense_graph, write_graph_file

    run = tmp_path / "run"
    shutil.copytree(analyzed_run, run, ignore=shutil.ignore_patterns("share", ".locks", ".strata.lock"))
    write_graph_file(run)
    doc = write_dense_graph(run)
    with dashboard_server(run) as url:
        page.set_default_timeout(LOAD_MS)
        page.goto(f"{url}/?page=circuits&graph={TRAIN}/dense")
        page.locator(".js-plotly-plot .scatterlayer .trace").last.locator(".point").first.wait_for()
        page.get_by_text("drawing the 3,000 strongest of their 3,160 links").wait_for()
        drawn = page.evaluate("() => document.querySelector('.js-plotly-plot').data"
                              ".filter(t => t.mode === 'lines').reduce((n, t) => n + t.x.length / 3, 0)")
        assert drawn == 3000
        points = page.locator(".js-plotly-plot .scatterlayer .trace").last.locator(".point")
        assert points.count() == len(doc["nodes"])
