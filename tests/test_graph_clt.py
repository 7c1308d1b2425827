"""Attribution graphs on a cross-layer transcoder (the tiny Llama's three MLPs; a second CLT covers MLPs 0 and 2
only), and the graph-vs-intervention test on the frozen linearised model for a CLT and for per-layer transcoders:
zeroing a feature moves each top logit by minus the graph's direct edge when later features are held, and by
minus the total effect the adjacency implies when they respond."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from activations import layout
from activations.manifest import load_manifest
from activations.model import load_model
from sae.checkpoint import load_saes
from sae.circuits.adapter import CLTAdapter, TranscoderSet, adapter_for
from sae.circuits.attribute import active_features, attribute, frozen_mlps
from sae.circuits.frozen import clean_pass, replacement_forward
from sae.circuits.graph_file import read_graph
from sae.circuits.linearised import centred, scale_feature, total_effects
from sae.circuits.prune import normalize, prune
from strata.cli import main

FAST = ["--batch-size", "256", "--expansion", "4", "--k", "8", "--progress", "false", "--device", "cpu"]
PROMPT = "The cat sat on the mat because"
APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    """A copy of the tiny harvest with a CLT over MLPs 0-2 ("clt"), one over MLPs 0 and 2 ("clt02") and
    transcoders with skip connections on MLPs 0 and 2 ("tc")."""
    run = tmp_path_factory.mktemp("graph-clt") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train", "index", "graphs", ".locks", ".strata.lock"))
    assert main(["train", str(run), "--mode", "clt", "--name", "clt", "--max-tokens", "2048", *FAST]) == 0
    assert main(["train", str(run), "--mode", "clt", "--layers", "0,2", "--name", "clt02", "--max-tokens", "1024",
                 *FAST]) == 0
    assert main(["train", str(run), "--mode", "transcoder", "--layers", "0,2", "--name", "tc", "--skip", "true",
                 "--max-tokens", "1024", *FAST]) == 0
    lm = load_model(load_manifest(run).model["id"], "cpu")
    clean = clean_pass(lm.model, torch.tensor(lm.tokenizer(PROMPT).input_ids))
    return run, lm, clean


@pytest.fixture(scope="module")
def clt_att(runs):
    run, lm, clean = runs
    adapter = adapter_for(load_saes(run, "clt"))
    return adapter, attribute(lm.model, clean, adapter, max_feature_nodes=10_000, batch_size=7)


def test_adapter_for_picks_the_clt_and_serves_the_interface(runs):
    run, lm, clean = runs
    adapter = adapter_for(load_saes(run, "clt"))
    assert isinstance(adapter, CLTAdapter) and adapter.mode == "clt" and adapter.layers == [0, 1, 2]
    assert isinstance(adapter_for(load_saes(run, "tc")), TranscoderSet)
    clt = adapter.clt
    assert [adapter.feature_offset(L) for L in adapter.layers] == [0, clt.n, 2 * clt.n]
    assert adapter.n_latents(1) == clt.n and adapter.sae_id(2) == "clt" and adapter.skip(1) is None
    idx = torch.tensor([3, 7])
    assert adapter.decoder_vectors(2, 1, idx) is None  # nothing written to earlier layers
    torch.testing.assert_close(adapter.decoder_vectors(0, 2, idx), clt.decoder_vectors(0, 2, idx))
    # encoder_vectors are the pre-activation's direction in raw mlp_in units: pre = x . enc + b_enc
    x = clean.mlp_in[1][-1:]
    pre = x @ adapter.encoder_vectors(1, torch.arange(clt.n)).t() + clt.b_enc[1]
    acts = adapter.encode_layer(1, x)
    on = acts > 0
    assert bool(on.any())
    torch.testing.assert_close(acts[on], pre[on], rtol=1e-4, atol=1e-5)  # TopK: active latents pass pre through
    partial = adapter_for(load_saes(run, "clt02"))
    assert partial.layers == [0, 2] and partial.decoder_vectors(0, 1, idx) is None  # MLP 1 is not covered


@pytest.mark.parametrize("name", ["clt", "clt02"])
def test_clt_replacement_with_error_nodes_reproduces_clean_logits(runs, name):
    run, lm, clean = runs
    adapter = adapter_for(load_saes(run, name))
    reference = lm.model(clean.ids[None]).logits[0]
    feats = active_features(adapter, clean)
    const, skips, errors = frozen_mlps(adapter, clean)
    _, logits = replacement_forward(lm.model, clean, const, skips, {})
    assert torch.allclose(logits, reference, atol=1e-5), float((logits - reference).abs().max())
    # a covered MLP's output is the writes of every source layer at or before it + the bias + its error node
    layer, pos, idx, act = feats
    clt = adapter.clt
    for t in adapter.layers:
        writes = torch.zeros_like(clean.mlp_out[t])
        for s in [s for s in adapter.layers if s <= t]:
            sel = layer == s
            writes.index_add_(0, pos[sel], act[sel, None] * adapter.decoder_vectors(s, t, idx[sel]))
        ti = clt.cfg.layers.index(t)
        total = writes + clt.b_dec[ti] / clt.cfg.out_scales[ti] + errors[t]
        assert torch.allclose(total, clean.mlp_out[t], atol=1e-5)
        assert float(errors[t].norm()) < float(clean.mlp_out[t].norm())  # the CLT explains part of each output
    if name == "clt02":
        assert torch.equal(errors[1], clean.mlp_out[1])  # uncovered MLP 1: all of its output is error


def test_each_clt_edge_equals_the_effect_measured_on_the_frozen_model(runs, clt_att):
    run, lm, clean = runs
    adapter, att = clt_att
    const, skips, _ = frozen_mlps(adapter, clean)
    T, n_layers, Fv, K = att.T, att.n_layers, att.visited.numel(), att.logit_ids.numel()
    N = att.adjacency.shape[0]
    assert Fv == att.feat_layer.numel()  # budget not reached: every active feature is a node

    def source_writes(j) -> dict:
        """The source's write vectors: a CLT feature writes into its own MLP output and every later one."""
        w = {}
        if j < Fv:
            f = int(att.visited[j])
            s, p = int(att.feat_layer[f]), int(att.feat_pos[f])
            for t in range(s, n_layers):
                w[t] = torch.zeros_like(clean.embed_TD)
                w[t][p] = att.feat_act[f] * adapter.decoder_vectors(s, t, att.feat_idx[f:f + 1])[0]
        elif j < Fv + n_layers * T:
            L, p = divmod(j - Fv, T)
            w[L] = torch.zeros_like(clean.embed_TD)
            w[L][p] = att.error_vectors[L, p]
        else:
            p = j - Fv - n_layers * T
            w["E"] = torch.zeros_like(clean.embed_TD)
            w["E"][p] = clean.embed_TD[p]
        return w

    def target(i):
        if i >= N - K:
            return lambda xs, lg: centred(lg, att.logit_ids[i - (N - K)])
        f = int(att.visited[i])
        L, p = int(att.feat_layer[f]), int(att.feat_pos[f])
        enc = adapter.encoder_vectors(L, att.feat_idx[f:f + 1])[0]
        return lambda xs, lg: xs[L][p] @ enc

    g = torch.Generator().manual_seed(0)
    by_layer = {L: [i for i in range(Fv) if int(att.feat_layer[att.visited[i]]) == L] for L in (1, 2)}
    targets = list(range(N - K, N)) + [by_layer[L][int(j)] for L in (1, 2)
                                        for j in torch.randint(len(by_layer[L]), (3,), generator=g)]
    layer0 = [i for i in range(Fv) if int(att.feat_layer[att.visited[i]]) == 0]
    sources = (torch.randperm(N - K, generator=g)[:20].tolist()  # any node
               + [layer0[int(j)] for j in torch.randint(len(layer0), (6,), generator=g)])  # multi-decoder sources
    base = replacement_forward(lm.model, clean, const, skips, {})
    checked = 0
    for j in sources:
        moved = replacement_forward(lm.model, clean, const, skips, source_writes(j))
        for i in targets:
            measured = float(target(i)(*moved) - target(i)(*base))
            assert float(att.adjacency[i, j]) == pytest.approx(measured, rel=1e-3, abs=1e-5), (i, j)
            checked += measured != 0
    assert checked > 20
    # a layer-0 feature's edge to a layer-2 feature includes what its layer-1 decoder writes (not only layer 0's)
    f0, f2 = int(att.visited[layer0[0]]), by_layer[2][0]
    only_own = {0: source_writes(layer0[0])[0]}
    moved = replacement_forward(lm.model, clean, const, skips, only_own)
    own_effect = float(target(f2)(*moved) - target(f2)(*base))
    assert float(att.feat_layer[f0]) == 0
    assert abs(float(att.adjacency[f2, layer0[0]]) - own_effect) > 1e-6


def test_decoder_vectors_gathered_per_batch_give_the_same_graph(runs, clt_att):
    run, lm, clean = runs
    adapter, att = clt_att  # held: the tiny CLT's decoder vectors fit the default budget
    lean = attribute(lm.model, clean, adapter, max_feature_nodes=10_000, batch_size=7, hold_bytes=0)
    torch.testing.assert_close(lean.adjacency, att.adjacency, rtol=1e-5, atol=1e-7)


def test_clt_pruning_keeps_the_influence_it_reports(clt_att):
    _, att = clt_att
    adj, probs = att.adjacency, att.logit_probs
    N, K, Fv, T = adj.shape[0], probs.numel(), att.visited.numel(), att.T
    pr = prune(adj, probs, Fv, T, node_threshold=0.8, edge_threshold=0.98)
    a = normalize(adj).double()
    eye = torch.eye(N, dtype=torch.float64)
    w = torch.zeros(N, dtype=torch.float64)
    w[N - K:] = probs.double()
    infl = w @ (torch.linalg.inv(eye - a) - eye)
    assert torch.allclose(pr.raw_influence.double(), infl, atol=1e-6)
    body = infl[:N - K]
    assert pr.influence_kept == pytest.approx(float(body[pr.node_mask[:N - K]].sum() / body.sum()), abs=1e-6)
    assert 0.5 < pr.influence_kept <= 1.0 and int(pr.node_mask.sum()) < N


def test_graph_cli_on_a_clt_run_and_the_circuits_page_opens_it(runs, monkeypatch, capsys):
    from streamlit.testing.v1 import AppTest

    run, lm, clean = runs
    adapter = adapter_for(load_saes(run, "clt"))
    layer, pos, idx, act = active_features(adapter, clean, 1)  # position 0 was left out of training (exclude_first)
    one = int(((layer == 1).float() * act).argmax())  # the strongest layer-1 feature, pinned by its CLT number
    number = adapter.feature_offset(1) + int(idx[one])
    assert main(["graph", str(run), "--name", "clt", "--prompt", PROMPT, "--graph-name", "cat",
                 "--pin", f"1:{number}@{int(pos[one])}"]) == 0
    assert "influence kept" in capsys.readouterr().out
    doc = read_graph(layout.graph_path(run, "clt", "cat"))
    m = doc["metadata"]
    assert m["mode"] == "clt" and m["saes"] == ["clt", "clt", "clt"] and m["uncovered_layers"] == []
    feats = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feats and {n["feature_type"] for n in doc["nodes"]} <= {"cross layer transcoder", "mlp reconstruction error",
                                                                   "embedding", "logit"}
    n = adapter.clt.n
    for node in feats:  # a node lives at its encoder layer; its number is the CLT's (layer block + latent)
        L, p = int(node["layer"]), node["ctx_idx"]
        assert node["sae"] == "clt" and node["node_id"] == f"{L}_{node['feature']}_{p}"
        assert L * n <= node["feature"] < (L + 1) * n
        a = adapter.encode_layer(L, clean.mlp_in[L])[p, node["feature"] - L * n]
        assert node["activation"] == pytest.approx(float(a), rel=1e-5)
    pinned = f"1_{number}_{int(pos[one])}"
    assert doc["qParams"]["pinnedIds"] == [pinned] and pinned in {x["node_id"] for x in feats}

    monkeypatch.setenv("STRATA_RUN", str(run))
    monkeypatch.setenv("STRATA_READ_ONLY", "1")
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["page"] = "circuits"
    at.query_params["graph"] = "clt/cat"
    at.run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert at.selectbox(key="circuits_graph").value == "clt/cat"
    (chart,) = [c for c in at.get("plotly_chart") if "token position" in c.proto.spec]
    nodes = next(t for t in json.loads(chart.proto.spec)["data"] if t.get("name") == "nodes")
    drawn = {cd[0]: (x, y, cd[1]) for cd, x, y in zip(nodes["customdata"], nodes["x"], nodes["y"])}
    assert set(drawn) == {x["node_id"] for x in doc["nodes"]}
    x, y, href = drawn[pinned]
    assert y == 1 and abs(x - int(pos[one])) <= 0.4  # at its encoder layer and position
    assert href == f"?page=features&train=clt&sae=clt&f={number}"  # the CLT's own feature page


@pytest.mark.parametrize("name", ["clt", "tc"])
def test_zeroing_a_feature_moves_the_logits_as_the_graph_predicts(runs, name):
    run, lm, clean = runs
    adapter = adapter_for(load_saes(run, name))
    att = attribute(lm.model, clean, adapter, max_feature_nodes=10_000, batch_size=64)
    feats = (att.feat_layer, att.feat_pos, att.feat_idx, att.feat_act)
    Fv, K = att.visited.numel(), att.logit_ids.numel()
    assert Fv == att.feat_layer.numel()
    direct = att.adjacency[-K:, :Fv]
    total = total_effects(att)
    # the paths the adjacency implies, computed independently: A_LF (I - D^-1 A_FF)^-1
    a = att.adjacency.double()
    m = a[:Fv, :Fv] / att.feat_act[att.visited].double()[:, None]
    paths = a[-K:, :Fv] @ torch.linalg.inv(torch.eye(Fv, dtype=torch.float64) - m)
    torch.testing.assert_close(total.double(), paths, rtol=1e-4, atol=1e-5)

    base = centred(replacement_forward(lm.model, clean, *frozen_mlps(adapter, clean)[:2], {})[1], att.logit_ids)
    tol = 1e-6 * float(clean.logits_TV[-1].abs().max())  # float32 rounding of the logits themselves
    through_features = (total - direct).abs().max(0).values
    picks = (through_features.topk(3).indices.tolist() + direct.abs().max(0).values.topk(2).indices.tolist()
             + torch.randperm(Fv, generator=torch.Generator().manual_seed(1))[:3].tolist())
    # zeroing (factor 0), and scaling by -999: the linearised model is linear in the factor, so amplifying a
    # feature's change lifts the small effects of this tiny random model far above float rounding
    for j in picks:
        f = int(att.visited[j])
        for factor in (0.0, -999.0):
            held = centred(scale_feature(lm.model, clean, adapter, feats, f, factor), att.logit_ids) - base
            torch.testing.assert_close(held, (factor - 1) * direct[:, j], rtol=1e-3, atol=tol)
            free = centred(scale_feature(lm.model, clean, adapter, feats, f, factor, respond=True),
                           att.logit_ids) - base
            torch.testing.assert_close(free, (factor - 1) * total[:, j], rtol=1e-3, atol=tol)
    # the responding features matter: at factor -999 the held and free predictions differ by 100x the tolerance
    assert 1000 * float(through_features[picks[0]]) > 100 * tol


@pytest.mark.slow
def test_clt_graph_on_real_smollm2(smollm2_mlp_run):
    run = smollm2_mlp_run
    assert main(["train", str(run), "--mode", "clt", "--name", "clt", "--arch", "topk", "--k", "16",
                 "--expansion", "1", "--batch-size", "512", "--heldout-fraction", "0", "--progress", "false"]) == 0
    prompt = "The capital of France is"
    # thresholds 1: nothing pruned (with 27 of 30 MLPs frozen as error nodes, pruning would keep mostly errors)
    assert main(["graph", str(run), "--name", "clt", "--prompt", prompt, "--max-feature-nodes", "256",
                 "--node-threshold", "1", "--edge-threshold", "1"]) == 0
    doc = read_graph(layout.graph_path(run, "clt", "the-capital-of-france-is"))
    assert doc["metadata"]["mode"] == "clt"
    assert [u["layer"] for u in doc["metadata"]["uncovered_layers"]] == list(range(3, 30))
    lm = load_model("smollm2-135m", "cpu")
    ids = torch.tensor(lm.tokenizer(prompt).input_ids)
    adapter = adapter_for(load_saes(run, "clt"))
    clean = clean_pass(lm.model, ids)
    const, skips, _ = frozen_mlps(adapter, clean)
    base = replacement_forward(lm.model, clean, const, skips, {})[1]
    assert torch.allclose(base[-1], lm.model(ids[None]).logits[0, -1], atol=1e-3)
    # the strongest edge from a CLT feature to a logit is what all its decoders' writes do
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    links = [lk for lk in doc["links"] if lk["target"].startswith("L_") and lk["source"] in nodes
             and nodes[lk["source"]]["feature_type"] == "cross layer transcoder"]
    assert links
    link = max(links, key=lambda lk: abs(lk["weight"]))
    src = nodes[link["source"]]
    s, p = int(src["layer"]), src["ctx_idx"]
    i = torch.tensor([src["feature"] - adapter.feature_offset(s)])
    writes = {}
    for t in adapter.layers[adapter.layers.index(s):]:
        writes[t] = torch.zeros_like(clean.embed_TD)
        writes[t][p] = src["activation"] * adapter.decoder_vectors(s, t, i)[0]
    moved = replacement_forward(lm.model, clean, const, skips, writes)[1]
    tok = torch.tensor([int(link["target"].split("_")[1])])
    measured = float(centred(moved, tok) - centred(base, tok))
    assert link["weight"] == pytest.approx(measured, rel=1e-2, abs=1e-4)
