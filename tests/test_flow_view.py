"""The Flow page and the lineage panel, as a researcher uses them on a small analysed run: a layered graph of
matched features (causal matches when the index has them, a bank's correlation matches otherwise), narrowed by
explanation text or a starting feature, and each feature page's upstream / downstream matches."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from markupsafe import escape
from test_dashboard_pages import all_html, app, assert_no_active_markup
from test_dashboard_support import XSS_PAYLOADS, add_matches, synthetic_run

from dashboard import flow_graph
from sae.analysis.index_file import FeatureIndex

LITERAL = "fires on a+b (c) [x]*"  # regex characters, to be matched as plain text


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """An index as older `strata analyze` wrote it: a bank's correlation matches, no matches/ groups."""
    vocab = [f"tok{i}" for i in range(40)] + XSS_PAYLOADS
    return synthetic_run(tmp_path_factory.mktemp("flow") / "run", vocab)


@pytest.fixture(scope="module")
def causal(legacy, tmp_path_factory):
    """The same run with causal matches (adjacent bank pairs and a user pair resid.0 -> resid.2), and one
    explanation holding regex characters and one holding markup."""
    run = tmp_path_factory.mktemp("flow-causal") / "run"
    shutil.copytree(legacy, run)
    path = run / "index" / "synth.h5"
    add_matches(path, ("resid.0", "resid.2"))
    with h5py.File(path, "r+") as f:
        best = f["matches/0/best_idx"][()]
        linked = [int(i) for i in np.nonzero(best >= 0)[0]]
        expl = f["saes/resid.0/explanation"][()].astype(object)
        expl[linked[0]] = LITERAL
        expl[linked[1]] = XSS_PAYLOADS[1]
        del f["saes/resid.0/explanation"]
        f.create_dataset("saes/resid.0/explanation", data=expl, dtype=h5py.string_dtype("utf-8"))
    return run


@pytest.fixture(scope="module")
def single(legacy, tmp_path_factory):
    """A training run with one per-layer SAE: nothing spans depth."""
    run = tmp_path_factory.mktemp("flow-single") / "run"
    shutil.copytree(legacy, run)
    with h5py.File(run / "index" / "synth.h5", "r+") as f:
        for sid in ("resid.0", "resid.2", "multi", "cross"):
            del f[f"saes/{sid}"]
        del f["paths"]
        info = json.loads(f["saes/resid.1"].attrs["info"])
        f["saes/resid.1"].attrs["info"] = json.dumps({**info, "match_next": None})
        f.attrs["residual_similarity"] = "[]"
    return run


def sankey(at) -> dict:
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return next(s["data"][0] for s in specs if s["data"] and s["data"][0]["type"] == "sankey")


def node_names(trace) -> list[tuple[str, int]]:
    """(sae, feature) of each node, from its hover text "<sae> #<feature><br>..."."""
    return [(h.split(" #")[0], int(h.split(" #")[1].split("<br>")[0])) for _, h in trace["node"]["customdata"]]


def test_flow_page_draws_causal_matches_as_a_layered_graph(causal, monkeypatch):
    idx = FeatureIndex(causal / "index" / "synth.h5")
    at = app(causal, monkeypatch, page="flow", train="synth")
    assert at.header[0].value == "Flow" and at.slider(key="flow_nodes").value == 60
    trace = sankey(at)
    nodes = node_names(trace)
    assert 10 <= len(nodes) <= 60 and len(set(nodes)) == len(nodes)
    # columns in depth order, left to right; each node labelled with its explanation and density
    depth = {"resid.0": 0, "resid.1": 1, "resid.2": 2}
    xs = trace["node"]["x"]
    for (s1, _), x1 in zip(nodes, xs):
        for (s2, _), x2 in zip(nodes, xs):
            assert (depth[s1] < depth[s2]) == (x1 < x2 - 1e-9)
    for (sid, f), label in zip(nodes, trace["node"]["label"]):
        density = float(idx.column(sid, "frequency")[f])
        assert label.startswith(f"#{f} ") and label.endswith(f"· {density:.1e}")
    # link width = the causal effect of the best match, colour = how many methods agree
    for src, dst, value, colour in zip(trace["link"]["source"], trace["link"]["target"], trace["link"]["value"],
                                       trace["link"]["color"]):
        (up, i), (down, j) = nodes[src], nodes[dst]
        m = next(m for m in idx.matches() if (m["up"], m["down"]) == (up, down))
        a = idx.match_arrays(m["j"])
        assert a["best_idx"][i] == j and value == pytest.approx(float(a["best_effect"][i]), rel=1e-5)
        n_agree = bin(int(a["agree"][i])).count("1")
        assert colour == ["rgba(148, 163, 184, 0.45)", "rgba(148, 163, 184, 0.55)", "rgba(96, 165, 250, 0.6)",
                          "rgba(37, 99, 235, 0.65)", "rgba(30, 58, 138, 0.75)"][n_agree]
    # the strongest link of the whole index is drawn
    top = max(((m["up"], int(i), m["down"], float(a["best_effect"][i])) for m in idx.matches()
               for a in [idx.match_arrays(m["j"])] for i in np.nonzero(a["best_idx"] >= 0)[0]), key=lambda t: t[3])
    assert (top[0], top[1]) in nodes
    # one click opens any node's page: a link per node under the graph
    page = all_html(at)
    for sid, f in nodes:
        assert f"?page=features&amp;train=synth&amp;sae={sid}&amp;f={f}\"" in page
    assert_no_active_markup(page)
    assert not any("re-run `strata analyze`" in c.value for c in at.caption)


def test_node_cap_keeps_the_graph_readable(causal, monkeypatch):
    at = app(causal, monkeypatch, page="flow", train="synth")
    at.slider(key="flow_nodes").set_value(10).run()
    assert not at.exception
    trace = sankey(at)
    assert 2 <= len(trace["node"]["label"]) <= 10 and len(trace["link"]["source"]) >= 1


def test_explanation_filter_is_plain_text(causal, monkeypatch):
    idx = FeatureIndex(causal / "index" / "synth.h5")
    expl = idx.column("resid.0", "explanation")
    f = int(np.nonzero(expl == LITERAL)[0][0])
    at = app(causal, monkeypatch, page="flow", train="synth")
    at.text_input(key="flow_text").input("A+B (C) [x]*").run()  # any case, regex characters as text
    assert not at.exception and not at.error
    trace = sankey(at)
    nodes = node_names(trace)
    assert ("resid.0", f) in nodes
    # everything drawn is linked to it: every link touches a node reached from it
    reached = {("resid.0", f)}
    links = list(zip(trace["link"]["source"], trace["link"]["target"]))
    for _ in range(len(links)):
        for s, t in links:
            if nodes[s] in reached or nodes[t] in reached:
                reached |= {nodes[s], nodes[t]}
    assert reached == set(nodes)
    # a pattern that would match everything as a regex matches nothing as text
    at.text_input(key="flow_text").input(".*").run()
    assert not at.get("plotly_chart") or all("sankey" not in c.proto.spec for c in at.get("plotly_chart"))
    assert any("No links touch explanations containing ` .* `" in i.value for i in at.info)


def test_explanations_with_markup_stay_text_in_the_graph(causal, monkeypatch):
    at = app(causal, monkeypatch, page="flow", train="synth")
    at.text_input(key="flow_text").input("onerror").run()
    trace = sankey(at)
    label = next(lab for lab in trace["node"]["label"] if "onerror" in lab)
    assert "<img" not in label and "&lt;img" in label  # plotly shows the entity as the character
    assert_no_active_markup(all_html(at))


def test_starting_feature_shows_its_chain(causal, monkeypatch):
    idx = FeatureIndex(causal / "index" / "synth.h5")
    a = idx.match_arrays(0)  # resid.0 -> resid.1
    i = int(np.nonzero(a["best_idx"] >= 0)[0][0])
    at = app(causal, monkeypatch, page="flow", train="synth", start=f"resid.0:{i}")
    assert at.text_input(key="flow_start").value == f"resid.0:{i}"
    nodes = node_names(sankey(at))
    assert ("resid.0", i) in nodes and ("resid.1", int(a["best_idx"][i])) in nodes
    at.text_input(key="flow_start").input(f"resid.1 #{int(a['best_idx'][i])}").run()  # typed: kept in the link
    assert at.query_params["start"] == f"resid.1 #{int(a['best_idx'][i])}" and ("resid.0", i) in node_names(sankey(at))
    at.text_input(key="flow_start").input("resid.9:1").run()
    assert [e.value for e in at.error] == ["No feature ` resid.9:1 ` to start from: write SAE:feature, e.g. "
                                           "resid.0:0 (SAEs with links: resid.0, resid.1, resid.2)."]


def test_old_index_shows_correlation_links_and_says_how_to_get_causal_ones(legacy, monkeypatch):
    at = app(legacy, monkeypatch, page="depth", train="synth")  # the page's old name still opens it
    assert at.header[0].value == "Flow"
    assert any("re-run `strata analyze` for causal matches" in c.value for c in at.caption)
    trace = sankey(at)
    idx = FeatureIndex(legacy / "index" / "synth.h5")
    nodes = node_names(trace)
    for src, dst, value in zip(trace["link"]["source"], trace["link"]["target"], trace["link"]["value"]):
        (up, i), (_, j) = nodes[src], nodes[dst]
        assert idx.column(up, "best_next_idx")[i] == j
        assert value == pytest.approx(float(idx.column(up, "best_next_corr")[i]), rel=1e-5)
    specs = " ".join(c.proto.spec for c in at.get("plotly_chart"))
    assert "features x layers" in specs and "residual stream" in specs


def test_a_run_with_one_sae_says_depth_views_need_two(single, monkeypatch):
    at = app(single, monkeypatch, page="flow", train="synth")
    assert [i.value for i in at.info] == [
        f"Depth views need two or more SAEs or a multi-layer SAE; training run synth has one (resid.1). Train a "
        f"per-layer bank (`strata train {single.resolve()} --layers 0-3`) or a multi-layer SAE (`--mode multilayer`) "
        "and analyse it."]
    assert not at.get("plotly_chart")
    at = app(single, monkeypatch, page="features", train="synth", sae="resid.1", f=3)
    assert "Lineage" not in all_html(at)  # no panel where nothing is matched


def test_lineage_panel_lists_causal_matches_up_and_down(causal, monkeypatch):
    idx = FeatureIndex(causal / "index" / "synth.h5")
    a = idx.match_arrays(0)
    f = int(np.bincount(a["best_idx"][a["best_idx"] >= 0]).argmax())  # a resid.1 feature with upstream matches
    lin = idx.lineage("resid.1", f)
    assert lin["upstream"] and lin["downstream"]
    at = app(causal, monkeypatch, page="features", train="synth", sae="resid.1", f=f)
    page = all_html(at)
    assert "**Lineage**" in page
    tables = [m.value for m in at.markdown if "causal effect" in m.value]
    assert len(tables) == 2  # upstream, then downstream
    expl = idx.column("resid.2", "explanation")
    for table, entries in zip(tables, (lin["upstream"], lin["downstream"])):
        assert table.count("<tr>") == 1 + len(entries)
        for e in entries:
            assert f"sae={e['sae']}&amp;f={e['feature']}\"" in table and f"{e['effect']:.3f}" in table
    down = lin["downstream"][0]
    assert down["effect"] == max(e["effect"] for e in lin["downstream"])  # strongest first
    assert escape(str(expl[down["feature"]])[:80]) in tables[1]  # with its explanation
    assert f"?page=flow&amp;train=synth&amp;start=resid.1%3A{f}" in page  # open its chain in the Flow view
    assert_no_active_markup(page)


def test_lineage_on_an_old_index_uses_correlation_matches(legacy, monkeypatch):
    idx = FeatureIndex(legacy / "index" / "synth.h5")
    f = int(idx.column("resid.0", "best_next_idx")[0])
    at = app(legacy, monkeypatch, page="features", train="synth", sae="resid.1", f=f)
    assert any("re-run `strata analyze` for causal matches" in c.value for c in at.caption)
    tables = [m.value for m in at.markdown if "causal effect" in m.value]
    assert "sae=resid.0&amp;f=0\"" in tables[0] and "sae=resid.2" in tables[1]


def test_multilayer_feature_is_born_peaks_and_fades(causal, monkeypatch):
    idx = FeatureIndex(causal / "index" / "synth.h5")
    mass = idx.column("multi", "layer_mass")
    f = int(np.argmax(mass[:, 1] / np.maximum(mass.max(1), 1e-9) * (mass.max(1) > 0)))  # a feature peaking mid-way
    at = app(causal, monkeypatch, page="features", train="synth", sae="multi", f=f)
    shown = {m.label: m.value for m in at.metric}
    strong = np.nonzero(mass[f] >= 0.1 * mass[f].max())[0]
    assert shown["born at layer"] == str(strong[0]) and shown["fades after layer"] == str(strong[-1])
    assert shown["peaks at layer"] == str(int(np.argmax(mass[f])))


def test_life_cycle_thresholds():
    layers = [3, 6, 9, 12, 15]
    assert flow_graph.life_cycle(layers, np.array([0.05, 0.2, 1.0, 0.5, 0.09])) == {"born": 6, "peak": 9, "fades": 12}
    assert flow_graph.life_cycle(layers, np.array([0.1, 0.0, 0.0, 0.0, 1.0])) == {"born": 3, "peak": 15, "fades": 15}
    assert flow_graph.life_cycle(layers, np.zeros(5)) is None


def test_flow_selection_respects_the_cap_and_keeps_links_whole(causal):
    idx = FeatureIndex(causal / "index" / "synth.h5")
    links, is_causal = flow_graph.all_links(idx)
    assert is_causal and (links["weight"].diff().dropna() <= 0).all()  # strongest first
    expl = {s: idx.column(s, "explanation") for s in idx.sae_ids}
    dens = {s: idx.column(s, "frequency") for s in idx.sae_ids}
    for cap in (2, 7, 30, 500):
        fl = flow_graph.flow(idx, links, True, expl, dens, max_nodes=cap)
        assert len(fl.nodes) <= cap and len(fl.links) >= 1
        assert set(fl.links["src"]) | set(fl.links["dst"]) == set(range(len(fl.nodes)))  # no orphan node
    fl = flow_graph.flow(idx, links, True, expl, dens, max_nodes=500)
    assert len(fl.links) == len(links) and fl.columns == ["resid.0", "resid.1", "resid.2"]


def test_share_of_a_one_sae_run_has_no_flow_page(single, tmp_path):
    from strata.cli import main

    out = tmp_path / "bundle"
    assert main(["share", str(single), "--features", "resid.1:0-3", "--out", str(out)]) == 0
    pages = out / "train" / "synth"
    assert sorted(p.name for p in pages.iterdir()) == ["index.html", "resid.1"]
    assert "flow.html" not in (pages / "index.html").read_text()
    assert "<h2>Lineage</h2>" not in (pages / "resid.1" / "0.html").read_text()
