"""The Circuits page (AppTest) on a copy of the analysed tiny run with a hand-written graph file in the shared
schema (strata-graph/1): layout by position and layer, labels, hover contexts, node selection, the node threshold
on cumulative influence, supernodes and pinned nodes saved into the file (nothing else in it changes),
interventions and steering from the graph and the prompt explorer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from activations import layout
from dashboard.charts import short

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
PROMPT = "The quick brown fox jumps over"
TRAIN, GRAPH = "topk-layer", "quick-fox"


def write_graph_file(run: Path, train: str = TRAIN, name: str = GRAPH) -> dict:
    """A small graph over the prompt as `strata graph` writes it: embeddings, the strongest feature of resid.1
    at two positions and of resid.2 at the last, an error node, one logit; links of both signs."""
    from activations.hooks import capture
    from activations.model import load_model
    from sae.checkpoint import load_saes

    manifest = json.loads(layout.manifest_path(run).read_text())
    lm = load_model(manifest["model"]["id"], device="cpu")
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    tokens = lm.tokenizer.batch_decode([[int(t)] for t in ids[0]], clean_up_tokenization_spaces=False)
    saes = load_saes(run, train)
    acts = capture(lm.model, ["resid.1", "resid.2"], ids)
    last = ids.shape[1] - 1

    def strongest(sid, pos):
        f = saes[sid].encode(acts[sid][0][pos:pos + 1])[0]
        return int(f.argmax()), float(f.max())

    def feat(sid, pos, clerp, influence):
        j, v = strongest(sid, pos)
        layer = sid.split(".")[1]
        return {"node_id": f"{layer}_{j}_{pos}", "feature_type": "transcoder", "layer": layer, "ctx_idx": pos,
                "feature": j, "sae": sid, "activation": v, "influence": influence, "token_prob": 0.0,
                "is_target_logit": False, "clerp": clerp}

    emb = [{"node_id": f"E_{int(t)}_{p}", "feature_type": "embedding", "layer": "E", "ctx_idx": p, "feature": int(t),
            "sae": "", "activation": 0.0, "influence": 0.1, "token_prob": 0.0, "is_target_logit": False, "clerp": ""}
           for p, t in enumerate(ids[0])]
    # influence: circuit-tracer's cumulative score (c the most influential, then a, the error, b)
    a, b = feat("resid.1", 2, "<b>brown</b> & colours", 0.45), feat("resid.1", last, "", 0.95)
    c = feat("resid.2", last, "says fox", 0.2)
    err = {"node_id": f"1_err_{last}", "feature_type": "mlp reconstruction error", "layer": "1", "ctx_idx": last,
           "feature": -1, "sae": "", "activation": 0.0, "influence": 0.6, "token_prob": 0.0,
           "is_target_logit": False, "clerp": ""}
    top = int(lm.model(input_ids=ids).logits[0, -1].argmax())
    logit = {"node_id": f"L_{top}_{last}", "feature_type": "logit", "layer": "3", "ctx_idx": last, "feature": top,
             "sae": "", "activation": 0.0, "influence": 1.0, "token_prob": 0.3, "is_target_logit": True, "clerp": ""}
    links = [{"source": emb[2]["node_id"], "target": a["node_id"], "weight": 0.9},
             {"source": emb[last]["node_id"], "target": b["node_id"], "weight": 0.7},
             {"source": a["node_id"], "target": c["node_id"], "weight": 0.6},
             {"source": b["node_id"], "target": c["node_id"], "weight": -0.4},
             {"source": c["node_id"], "target": logit["node_id"], "weight": 1.2},
             {"source": err["node_id"], "target": logit["node_id"], "weight": -0.2}]
    doc = {"metadata": {"schema": "strata-graph/1", "slug": name, "scan": f"strata:{run.name}/{train}",
                        "prompt": PROMPT, "prompt_tokens": tokens, "prompt_ids": ids[0].tolist(),
                        "model": manifest["model"]["id"], "train": train, "saes": ["resid.1", "resid.2"],
                        "mode": "transcoder", "uncovered_layers": [], "node_threshold": 0.8, "edge_threshold": 0.98,
                        "influence_kept": 0.9, "replacement_score": 0.7, "completeness_score": 0.8,
                        "n_nodes_before": 40, "n_edges_before": 200, "seconds": 1.0,
                        "created": "2026-11-30T00:00:00", "strata_version": "test"},
           "nodes": [*emb, a, b, c, err, logit], "links": links,
           "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both"}}
    path = layout.graph_path(run, train, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return doc


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory, analyzed_run):
    run = tmp_path_factory.mktemp("circuits") / "run"
    shutil.copytree(analyzed_run, run, ignore=shutil.ignore_patterns("share", ".locks", ".strata.lock"))
    doc = write_graph_file(run)
    return run, doc


def app(run, monkeypatch, read_only=False, **query):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("STRATA_RUN", str(run))
    monkeypatch.setenv("STRATA_READ_ONLY", "1" if read_only else "0")
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in {"page": "circuits", **query}.items():
        at.query_params[k] = str(v)
    at.run()
    check(at)
    return at


def check(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def circuit_spec(at) -> dict:
    (chart,) = [c for c in at.get("plotly_chart") if "circuit" in c.proto.id or "token position" in c.proto.spec]
    return json.loads(chart.proto.spec)


def node_trace(spec) -> dict:
    return next(t for t in spec["data"] if t.get("name") == "nodes")


def all_html(at) -> str:
    return "\n".join(m.value for m in at.markdown)


def test_the_graph_is_laid_out_by_position_and_layer(graph_run, monkeypatch):
    run, doc = graph_run
    at = app(run, monkeypatch)
    assert at.header[0].value == "Circuits"
    assert at.selectbox(key="circuits_graph").value == f"{TRAIN}/{GRAPH}"
    spec = circuit_spec(at)
    nodes = node_trace(spec)
    by_id = {cd[0]: (x, y, text) for cd, x, y, text in zip(nodes["customdata"], nodes["x"], nodes["y"], nodes["text"])}
    assert set(by_id) == {n["node_id"] for n in doc["nodes"]}
    for n in doc["nodes"]:
        x, y, _ = by_id[n["node_id"]]
        assert abs(x - n["ctx_idx"]) <= 0.4  # x = token position
        assert y == (-1 if n["layer"] == "E" else int(n["layer"]))  # y = layer, embeddings at the bottom
    assert spec["layout"]["yaxis"]["ticktext"] == ["E", "1", "2", "logits"]
    assert spec["layout"]["xaxis"]["ticktext"] == [short(t, 12) for t in doc["metadata"]["prompt_tokens"]]
    # labels: the explanation (escaped for plotly) or what the node is
    texts = {i: t for i, (_, _, t) in by_id.items()}
    a, b, c = doc["nodes"][-5:-2]
    assert texts[a["node_id"]] == "&lt;b&gt;brown&lt;/b&gt; &amp; colours"
    assert texts[c["node_id"]] == "says fox" and texts[b["node_id"]] == f"L1 #{b['feature']} (+1)"
    # one label per (layer, position) cell, its most influential feature's, "+N" counting the others there
    cells = {}
    for n in doc["nodes"]:
        cells.setdefault((n["layer"], n["ctx_idx"]), []).append(texts[n["node_id"]])
    assert all(sum(bool(t) for t in ts) == 1 for ts in cells.values())
    assert all(ts == [t for t in ts if t] or any(f"(+{len(ts) - 1})" in t for t in ts) for ts in cells.values())
    # hover: the feature's top contexts from the run's index; the feature page link in customdata
    hover = dict(zip([cd[0] for cd in nodes["customdata"]], nodes["hovertext"]))
    assert "top contexts:" in hover[a["node_id"]] and "top contexts:" not in hover[doc["nodes"][0]["node_id"]]
    links = dict(zip([cd[0] for cd in nodes["customdata"]], [cd[1] for cd in nodes["customdata"]]))
    assert links[a["node_id"]] == f"?page=features&train={TRAIN}&sae=resid.1&f={a['feature']}"
    # every link drawn: 6 segments, blue and red
    lines = [t for t in spec["data"] if t.get("mode") == "lines"]
    assert sum(len(t["x"]) // 3 for t in lines) == len(doc["links"])
    assert {"rgba(37, 99, 235, 0.55)", "rgba(220, 38, 38, 0.55)"} == {t["line"]["color"] for t in lines}


def test_selecting_a_node_highlights_its_strongest_inputs_and_outputs(graph_run, monkeypatch):
    run, doc = graph_run
    at = app(run, monkeypatch)
    c = doc["nodes"][-3]  # resid.2's feature: two inputs (one inhibiting), one output
    at.selectbox(key="circuits_node").set_value(c["node_id"]).run()
    check(at)
    spec = circuit_spec(at)
    lines = [t for t in spec["data"] if t.get("mode") == "lines"]
    assert sum(len(t["x"]) // 3 for t in lines) == 3  # only its own links
    nodes = node_trace(spec)
    opacity = dict(zip([cd[0] for cd in nodes["customdata"]], nodes["marker"]["opacity"]))
    assert opacity[c["node_id"]] == 1.0 and opacity[doc["nodes"][0]["node_id"]] == 0.25
    page = all_html(at)
    assert f"?page=features&amp;train={TRAIN}&amp;sae=resid.2&amp;f={c['feature']}" in page
    assert "+0.6000" in page and "-0.4000" in page and "+1.2000" in page


def test_a_supernode_is_saved_into_the_graph_file_and_drawn(graph_run, monkeypatch, tmp_path):
    run, doc = graph_run
    path = layout.graph_path(run, TRAIN, GRAPH)
    before = json.loads(path.read_text())
    at = app(run, monkeypatch)
    members = [n["node_id"] for n in doc["nodes"][-5:-3]]
    at.multiselect(key="supernode_members").set_value(members)
    at.text_input(key="supernode_label").input("fox <features>")
    next(b for b in at.button if b.label == "Save supernode").click().run()
    check(at)
    after = json.loads(path.read_text())
    assert after["qParams"]["supernodes"] == [["fox <features>", *members]]
    assert {k: v for k, v in after.items() if k != "qParams"} == {k: v for k, v in before.items() if k != "qParams"}
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{GRAPH}.json"]  # no temporary left behind
    spec = circuit_spec(at)
    assert [a["text"] for a in spec["layout"]["annotations"]] == ["fox &lt;features&gt;"]
    assert len(spec["layout"]["shapes"]) == 1
    # removing it rewrites the same file
    at.selectbox(key="supernode_drop").set_value("fox <features>")
    next(b for b in at.button if b.label == "Remove").click().run()
    check(at)
    assert json.loads(path.read_text())["qParams"]["supernodes"] == []


def shown(at) -> dict:
    """node_id -> (marker symbol, marker edge colour) of the nodes drawn."""
    nodes = node_trace(circuit_spec(at))
    return {cd[0]: (sym, col) for cd, sym, col in zip(nodes["customdata"], nodes["marker"]["symbol"],
                                                       nodes["marker"]["line"]["color"])}


def test_a_pinned_node_is_saved_into_the_file_and_survives_the_node_threshold(graph_run, monkeypatch):
    run, doc = graph_run
    path = layout.graph_path(run, TRAIN, GRAPH)
    before = json.loads(path.read_text())
    a, b, c, err = doc["nodes"][-5:-1]
    at = app(run, monkeypatch)
    assert set(shown(at)) == {n["node_id"] for n in doc["nodes"]}  # threshold 1: everything
    at.slider(key="circuits_threshold").set_value(0.5).run()
    check(at)
    # the threshold keeps the nodes whose cumulative influence is at most 0.5 (tokens and logits always)
    assert set(shown(at)) == {n["node_id"] for n in doc["nodes"]} - {b["node_id"], err["node_id"]}
    lines = [t for t in circuit_spec(at)["data"] if t.get("mode") == "lines"]
    assert sum(len(t["x"]) // 3 for t in lines) == 3  # emb->a, a->c, c->logit: links of hidden nodes go too

    at.selectbox(key="circuits_node").set_value(b["node_id"]).run()
    at.button(key="circuits_pin").click().run()
    check(at)
    after = json.loads(path.read_text())
    assert after["qParams"]["pinnedIds"] == [b["node_id"]]
    assert {k: v for k, v in after.items() if k != "qParams"} == {k: v for k, v in before.items() if k != "qParams"}
    assert after["qParams"]["supernodes"] == before["qParams"]["supernodes"]
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{GRAPH}.json"]  # no temporary left behind
    drawn = shown(at)
    assert drawn[b["node_id"]] == ("diamond", "#dc2626")  # pinned: kept at threshold 0.5, highlighted
    assert err["node_id"] not in drawn and drawn[a["node_id"]][0] == "circle"
    assert "pinned" in " ".join(c.value for c in at.caption)
    assert at.button(key="circuits_pin").label == "Unpin node"
    # selecting another node fades the rest of the graph, but not the pinned node
    at.selectbox(key="circuits_node").set_value(a["node_id"]).run()
    nodes = node_trace(circuit_spec(at))
    opacity = dict(zip([cd[0] for cd in nodes["customdata"]], nodes["marker"]["opacity"]))
    assert opacity[b["node_id"]] == 1.0 and opacity[doc["nodes"][0]["node_id"]] == 0.25

    at.selectbox(key="circuits_node").set_value(b["node_id"]).run()
    at.button(key="circuits_pin").click().run()
    check(at)
    assert json.loads(path.read_text())["qParams"]["pinnedIds"] == []
    assert b["node_id"] not in shown(at)


def test_read_only_shows_the_graph_without_editing(graph_run, monkeypatch):
    run, doc = graph_run
    at = app(run, monkeypatch, read_only=True)
    assert circuit_spec(at)
    at.selectbox(key="circuits_node").set_value(doc["nodes"][-3]["node_id"]).run()
    check(at)
    assert not [b for b in at.button if b.label in ("Save supernode", "Run intervention", "Generate", "Pin node")]


def test_intervention_from_the_graph_matches_the_backend(graph_run, monkeypatch):
    from activations.model import load_model
    from sae.checkpoint import load_saes
    from sae.circuits.intervene import intervene, parse_edits

    run, doc = graph_run
    a = doc["nodes"][-5]
    at = app(run, monkeypatch)
    at.selectbox(key="circuits_node").set_value(a["node_id"]).run()
    key = f"civ-{GRAPH}-{a['node_id']}"
    edit = f"resid.1:{a['feature']}@{a['ctx_idx']}*0"
    assert at.text_input(key=f"{key}_edit").value == edit  # the selected node, zeroed at its position
    at.button(key=f"{key}_run").click().run()
    check(at)
    lm = load_model(doc["metadata"]["model"], device="cpu")
    want = intervene(lm.model, lm.tokenizer, load_saes(run, TRAIN), torch.tensor([doc["metadata"]["prompt_ids"]]),
                     parse_edits(edit), top=10)
    page = all_html(at)
    assert f"{want['logits'][0]['delta']:+.3f}" in page and f"{want['logits'][-1]['delta']:+.3f}" in page
    captions = " ".join(c.value for c in at.caption)
    assert ("downstream features that change most" in captions) == bool(want["features"])
    for r in want["features"]:
        assert f"{r['delta']:+.3f}" in page

    at.text_input(key=f"{key}_steer").input("resid.2:3*8")
    at.number_input(key=f"{key}_new").set_value(3)
    at.button(key=f"{key}_gen").click().run()
    check(at)
    assert len(at.code) == 2  # clean and steered continuations side by side
    assert any(m.value == "**steered continuation**" for m in at.markdown)


def test_bad_edit_is_one_error_line_on_the_page(graph_run, monkeypatch):
    run, _ = graph_run
    at = app(run, monkeypatch)
    at.text_input(key=f"civ-{GRAPH}-_edit").input("resid.1:99999*0")
    at.button(key=f"civ-{GRAPH}-_run").click().run()
    assert [e.value for e in at.error] == ["feature 99999 does not exist: SAE resid.1 has features 0-63; pick one in range"]


def test_prompt_explorer_has_the_intervention_panel(graph_run, monkeypatch):
    run, _ = graph_run
    at = app(run, monkeypatch, page="prompt")
    at.button(key="prompt_run").click().run()
    check(at)
    at.text_input(key="iv_edit").input("resid.0:1; resid.0:2*3")
    at.button(key="iv_run").click().run()
    check(at)
    assert "p edited" in all_html(at)


def test_no_graphs_says_how_to_make_one(analyzed_run, monkeypatch):
    at = app(analyzed_run, monkeypatch)
    assert any("strata graph" in i.value for i in at.info)


def test_a_broken_graph_file_is_one_error(graph_run, monkeypatch, tmp_path):
    run, _ = graph_run
    bad = layout.graph_path(run, TRAIN, "broken")
    bad.write_text('{"nodes": 3}')
    try:
        from streamlit.testing.v1 import AppTest

        monkeypatch.setenv("STRATA_RUN", str(run))
        at = AppTest.from_file(APP, default_timeout=60)
        at.query_params["page"] = "circuits"
        at.query_params["graph"] = f"{TRAIN}/broken"
        at.run()
        assert [e.value for e in at.error] == [f"{bad.resolve()} is not a strata-graph/1 graph; make it again with "
                                               f"`strata graph`"]
    finally:
        bad.unlink()


def write_dense_graph(run: Path, name: str = "dense") -> dict:
    """The small graph's embeddings and logit with 80 features linked all to all (3,160 links, more than the
    page draws), weights of both signs; each feature's first input is its strongest by far."""
    base = json.loads(layout.graph_path(run, TRAIN, GRAPH).read_text())
    T = len(base["metadata"]["prompt_ids"])
    feats = [{"node_id": f"{1 + i % 2}_{i}_{i % T}", "feature_type": "transcoder", "layer": str(1 + i % 2),
              "ctx_idx": i % T, "feature": i, "sae": f"resid.{1 + i % 2}", "activation": 1.0,
              "influence": 0.5, "token_prob": 0.0, "is_target_logit": False, "clerp": ""} for i in range(80)]
    g = torch.Generator().manual_seed(0)
    links = [{"source": feats[i]["node_id"], "target": feats[j]["node_id"],
              "weight": 5.0 if i == 0 else float(torch.rand(1, generator=g) * 2 - 1)}
             for j in range(80) for i in range(j)]
    doc = dict(base, nodes=[n for n in base["nodes"] if n["feature_type"] in ("embedding", "logit")] + feats,
               links=links, metadata=dict(base["metadata"], slug=name))
    layout.graph_path(run, TRAIN, name).write_text(json.dumps(doc))
    return doc


def test_a_dense_graph_draws_the_strongest_links_of_each_node(graph_run, monkeypatch):
    """A graph pruned with circuit-tracer's defaults can hold 300k links; the page draws the 3,000 carrying the
    largest share of their target's input and says so."""
    from dashboard.charts import MAX_LINKS

    run, _ = graph_run
    doc = write_dense_graph(run)
    try:
        at = app(run, monkeypatch, graph=f"{TRAIN}/dense")
        assert len(doc["links"]) == 3160 > MAX_LINKS == 3000
        assert any("drawing the 3,000 strongest of their 3,160 links" in c.value for c in at.caption)
        spec = circuit_spec(at)
        drawn = {(x0, y0, x1, y1) for t in spec["data"] if t.get("mode") == "lines"
                 for x0, y0, x1, y1 in zip(t["x"][::3], t["y"][::3], t["x"][1::3], t["y"][1::3])}
        assert sum(len(t["x"]) // 3 for t in spec["data"] if t.get("mode") == "lines") == MAX_LINKS
        nodes = node_trace(spec)
        xy = {cd[0]: (x, y) for cd, x, y in zip(nodes["customdata"], nodes["x"], nodes["y"])}
        assert len(xy) == len(doc["nodes"])  # every node is shown, only links are left out
        first = doc["nodes"][-80]["node_id"]  # feature 0: the strongest input of every other feature
        assert all((*xy[first], *xy[ln["target"]]) in drawn for ln in doc["links"] if ln["source"] == first)
    finally:
        layout.graph_path(run, TRAIN, "dense").unlink()
