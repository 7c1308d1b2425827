"""`strata graph` on the tiny Llama with transcoders on MLPs 0 and 2 (MLP 1 uncovered), as a researcher checks
an attribution graph: the replacement model gives the clean logits, every edge is the effect measured on the
frozen model, pruning keeps the influence it reports, and the file holds what the shared schema promises."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from activations import layout
from activations.manifest import load_manifest
from activations.model import load_model
from sae.checkpoint import load_saes
from sae.circuits.adapter import TranscoderSet
from sae.circuits.attribute import active_features, attribute, frozen_mlps
from sae.circuits.frozen import clean_pass, replacement_forward
from sae.circuits.graph_file import read_graph, save_qparams
from sae.circuits.prune import graph_scores, normalize, prune
from strata.cli import main

FAST = ["--batch-size", "256", "--expansion", "4", "--k", "8", "--progress", "false", "--device", "cpu"]
PROMPT = "The cat sat on the mat because"


@pytest.fixture(scope="module")
def tc_run(tmp_path_factory, tiny_run):
    run = tmp_path_factory.mktemp("graph") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train", "index", "graphs", ".locks", ".strata.lock"))
    assert main(["train", str(run), "--mode", "transcoder", "--layers", "0,2", "--name", "tc", "--skip", "true",
                 "--max-tokens", "2048", *FAST]) == 0
    return run


@pytest.fixture(scope="module")
def setup(tc_run):
    lm = load_model(load_manifest(tc_run).model["id"], "cpu")
    adapter = TranscoderSet(load_saes(tc_run, "tc"))
    ids = torch.tensor(lm.tokenizer(PROMPT).input_ids)
    clean = clean_pass(lm.model, ids)
    return lm, adapter, clean


@pytest.fixture(scope="module")
def att(setup):
    lm, adapter, clean = setup
    return attribute(lm.model, clean, adapter, max_feature_nodes=10_000, batch_size=7)


def test_replacement_with_error_nodes_reproduces_clean_logits(setup):
    lm, adapter, clean = setup
    reference = lm.model(clean.ids[None]).logits[0]
    feats = active_features(adapter, clean)
    const, skips, errors = frozen_mlps(adapter, clean)
    _, logits = replacement_forward(lm.model, clean, const, skips, {})
    assert torch.allclose(logits, reference, atol=1e-5), float((logits - reference).abs().max())
    # a covered MLP's output is exactly its nodes: features' writes + decoder bias + skip + the error node
    layer, pos, idx, act = feats
    for L in adapter.layers:
        sae = adapter.by_layer[L][1]
        sel = layer == L
        writes = torch.zeros_like(clean.mlp_out[L]).index_add_(
            0, pos[sel], act[sel, None] * adapter.decoder_vectors(L, L, idx[sel]))
        total = writes + sae.b_dec / sae.out_scale() + adapter.skip(L)(clean.mlp_in[L]) + errors[L]
        assert torch.allclose(total, clean.mlp_out[L], atol=1e-5)
        assert bool(sel.any()) and float(errors[L].norm()) > 0
    assert torch.equal(errors[1], clean.mlp_out[1])  # uncovered MLP 1: all of its output is error


def _run_with(lm, clean, const, skips, where=None, vector=None):
    """The frozen model with `vector` added at write point `where` = (layer or "E", position)."""
    if where is None:
        return replacement_forward(lm.model, clean, const, skips, {})
    w = torch.zeros_like(clean.embed_TD)
    w[where[1]] = vector
    return replacement_forward(lm.model, clean, const, skips, {where[0]: w})


def test_each_edge_equals_the_effect_measured_on_the_frozen_model(setup, att):
    _check_edges_against_frozen_model(setup, att, exclude_first=0)


def _check_edges_against_frozen_model(setup, att, exclude_first: int):
    lm, adapter, clean = setup
    const, skips, _ = frozen_mlps(adapter, clean, exclude_first)
    T, n_layers, Fv, K = att.T, att.n_layers, att.visited.numel(), att.logit_ids.numel()
    N = att.adjacency.shape[0]
    assert Fv == att.feat_layer.numel()  # budget not reached: every active feature is a node

    def source(j):
        if j < Fv:
            f = int(att.visited[j])
            L = int(att.feat_layer[f])
            return (L, int(att.feat_pos[f])), att.feat_act[f] * adapter.decoder_vectors(L, L, att.feat_idx[f:f + 1])[0]
        if j < Fv + n_layers * T:
            L, p = divmod(j - Fv, T)
            return (L, p), att.error_vectors[L, p]
        p = j - Fv - n_layers * T
        return ("E", p), clean.embed_TD[p]

    def target(i):
        if i >= N - K:
            tok = int(att.logit_ids[i - (N - K)])
            return lambda xs, lg: lg[-1, tok] - lg[-1].mean()
        f = int(att.visited[i])
        L, p = int(att.feat_layer[f]), int(att.feat_pos[f])
        enc = adapter.encoder_vectors(L, att.feat_idx[f:f + 1])[0]
        return lambda xs, lg: xs[L][p] @ enc

    g = torch.Generator().manual_seed(0)
    layer2 = [i for i in range(Fv) if int(att.feat_layer[att.visited[i]]) == 2]
    targets = list(range(N - K, N)) + [layer2[int(j)] for j in torch.randint(len(layer2), (3,), generator=g)]
    sources = torch.randperm(N - K, generator=g)[:25].tolist() + [Fv + n_layers * T + T - 1]  # + the last token
    sources += [Fv + L * T + p for L in (0, 2) for p in range(exclude_first)]  # errors holding whole MLPs
    # the frozen model is affine: running it with and without one source's write measures its direct effects
    base = _run_with(lm, clean, const, skips)
    checked = 0
    for j in sources:
        moved = _run_with(lm, clean, const, skips, *source(j))
        for i in targets:
            measured = float(target(i)(*moved) - target(i)(*base))
            assert float(att.adjacency[i, j]) == pytest.approx(measured, rel=1e-3, abs=1e-5), (i, j)
            checked += measured != 0
    assert checked > 20  # most sampled pairs are real edges, not structural zeros


def test_positions_left_out_of_training_have_no_feature_nodes(setup, att):
    """Training left out the first positions of every context (--exclude-first): there the graph freezes every MLP
    output whole (the error node holds it) and has no features; logits and edges stay exact."""
    lm, adapter, clean = setup
    first = 2
    cut = attribute(lm.model, clean, adapter, max_feature_nodes=10_000, batch_size=7, exclude_first=first)
    assert int(cut.feat_pos.min()) == first and bool((att.feat_pos < first).any())
    later = att.feat_pos >= first  # the same features as without the cut, from position `first` on
    assert torch.equal(cut.feat_idx, att.feat_idx[later]) and torch.equal(cut.feat_layer, att.feat_layer[later])
    const, skips, errors = frozen_mlps(adapter, clean, first)
    _, logits = replacement_forward(lm.model, clean, const, skips, {})
    assert torch.allclose(logits, lm.model(clean.ids[None]).logits[0], atol=1e-5)
    for L in range(len(clean.mlp_out)):
        assert torch.equal(errors[L, :first], clean.mlp_out[L][:first])  # the whole MLP output, skip term included
        assert torch.equal(errors[L, first:], att.error_vectors[L, first:])
    _check_edges_against_frozen_model(setup, cut, exclude_first=first)


def test_pruning_keeps_the_influence_it_reports(att):
    adj, probs = att.adjacency, att.logit_probs
    N, K, Fv, T = adj.shape[0], probs.numel(), att.visited.numel(), att.T
    pr = prune(adj, probs, Fv, T, node_threshold=0.8, edge_threshold=0.98)
    # influence recomputed independently: w B with B = (I - A)^-1 - I over the row-normalised |adjacency|
    a = normalize(adj).double()
    w = torch.zeros(N, dtype=torch.float64)
    w[N - K:] = probs.double()
    infl = w @ (torch.linalg.inv(torch.eye(N, dtype=torch.float64) - a) - torch.eye(N, dtype=torch.float64))
    assert torch.allclose(pr.raw_influence.double(), infl, atol=1e-6)
    # the score written as `influence` is circuit-tracer's: the running share of the total influence, the nodes
    # taken most influential first (the top node holds its own share; the least influential ones reach 1)
    moving = infl > 0
    expected = (infl[None, :] * (infl[None, :] >= infl[:, None])).sum(1) / infl.sum()
    assert torch.allclose(pr.influence.double()[moving], expected[moving], atol=1e-6)
    top = int(infl.argmax())
    assert float(pr.influence[top]) == pytest.approx(float(infl[top] / infl.sum()), abs=1e-6)
    assert float(pr.influence.max()) == pytest.approx(1.0, abs=1e-6)
    body = infl[:N - K]
    kept = float(body[pr.node_mask[:N - K]].sum() / body.sum())
    assert pr.influence_kept == pytest.approx(kept, abs=1e-6)
    assert 0.5 < pr.influence_kept <= 1.0
    assert int(pr.node_mask.sum()) < N and bool(pr.node_mask[N - K - T:].all())  # pruned; tokens and logits stay
    assert not bool((pr.edge_mask & ~(pr.node_mask[:, None] & pr.node_mask[None, :])).any())


def test_scores_as_circuit_tracer_defines_them():
    # nodes: feature, error, token, logit; logit <- feature (3) and error (1); feature <- token (2)
    adj = torch.zeros(4, 4)
    adj[3, 0], adj[3, 1], adj[0, 2] = 3.0, -1.0, 2.0
    replacement, completeness = graph_scores(adj, torch.tensor([1.0]), n_features=1, n_errors=1)
    assert replacement == pytest.approx(0.75)  # tokens 0.75 of the root influence, errors 0.25
    assert completeness == pytest.approx(2.5 / 2.75)  # the logit's input is 1/4 error; influences .75 .25 .75 +1


def test_graph_cli_writes_the_shared_schema(tc_run, setup, capsys):
    lm, adapter, clean = setup
    layer, pos, idx, act = active_features(adapter, clean, 1)  # tc trained without position 0 (--exclude-first 1)
    weakest = int(act.argmin())  # the feature least likely to survive pruning by itself
    pin = f"{int(layer[weakest])}:{int(idx[weakest])}@{int(pos[weakest])}"
    assert main(["graph", str(tc_run), "--name", "tc", "--prompt", PROMPT, "--pin", pin]) == 0
    assert "influence kept" in capsys.readouterr().out
    path = layout.graph_path(tc_run, "tc", "the-cat-sat-on-the-mat-because")
    doc = read_graph(path)
    m = doc["metadata"]
    assert m["schema"] == "strata-graph/1" and m["mode"] == "transcoder" and m["train"] == "tc"
    assert m["saes"] == [adapter.sae_id(0), adapter.sae_id(2)]
    assert [u["layer"] for u in m["uncovered_layers"]] == [1]
    assert m["untrained_positions"]["exclude_first"] == 1 and m["untrained_positions"]["positions"] == [0]
    assert not [n for n in doc["nodes"] if n["feature_type"] == "transcoder" and n["ctx_idx"] == 0]
    assert m["prompt_ids"] == clean.ids.tolist() and len(m["prompt_tokens"]) == len(m["prompt_ids"])
    assert 0 < m["influence_kept"] <= 1 and 0 <= m["replacement_score"] <= 1 and 0 <= m["completeness_score"] <= 1
    by_id = {n["node_id"]: n for n in doc["nodes"]}
    T, n_layers = clean.ids.numel(), len(clean.mlp_out)
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert {"embedding", "logit"} <= kinds and kinds <= {"transcoder", "mlp reconstruction error", "embedding", "logit"}
    for n in doc["nodes"]:
        t = n["feature_type"]
        if t == "transcoder":
            assert n["node_id"] == f"{n['layer']}_{n['feature']}_{n['ctx_idx']}" and n["activation"] > 0 and n["sae"]
        elif t == "mlp reconstruction error":
            assert n["node_id"] == f"{n['layer']}_err_{n['ctx_idx']}" and n["feature"] == -1
        elif t == "embedding":
            assert n["node_id"] == f"E_{n['feature']}_{n['ctx_idx']}" and m["prompt_ids"][n["ctx_idx"]] == n["feature"]
        else:
            assert n["layer"] == str(n_layers) and n["ctx_idx"] == T - 1 and n["is_target_logit"]
    # node influence is circuit-tracer's cumulative score: a running share of the total, in (0, 1]; the node
    # pruning keeps features up to the first one past the 0.8 threshold (pinned ones whatever their score)
    scored = [n for n in doc["nodes"] if n["feature_type"] != "logit"]
    assert all(0 < n["influence"] <= 1 + 1e-6 for n in scored)
    feats = sorted(n["influence"] for n in doc["nodes"] if n["feature_type"] == "transcoder")
    assert len([v for v in feats if v > m["node_threshold"]]) <= 1 + len(doc["qParams"]["pinnedIds"])
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    probs = clean.logits_TV[-1].softmax(-1)
    assert logits[0]["feature"] == int(probs.argmax())
    assert logits[0]["token_prob"] == pytest.approx(float(probs.max()), rel=1e-4)
    assert len([n for n in doc["nodes"] if n["feature_type"] == "embedding"]) == T
    assert all(lk["source"] in by_id and lk["target"] in by_id and lk["weight"] != 0 for lk in doc["links"])
    pinned_id = f"{int(layer[weakest])}_{int(idx[weakest])}_{int(pos[weakest])}"
    assert doc["qParams"]["pinnedIds"] == [pinned_id] and pinned_id in by_id
    # the dashboard's rewrite of qParams leaves everything else as it was
    save_qparams(path, [pinned_id], [["cat features", pinned_id, logits[0]["node_id"]]])
    again = json.loads(path.read_text())
    assert again["qParams"]["supernodes"] == [["cat features", pinned_id, logits[0]["node_id"]]]
    assert {k: again[k] for k in ("metadata", "nodes", "links")} == {k: doc[k] for k in ("metadata", "nodes", "links")}


def test_feature_budget_visits_the_most_influential_first(setup, att):
    lm, adapter, clean = setup
    small = attribute(lm.model, clean, adapter, max_feature_nodes=20, batch_size=7)
    assert small.visited.numel() == 20 < att.visited.numel()
    assert small.adjacency.shape[0] == 20 + att.n_layers * att.T + att.T + att.logit_ids.numel()
    # rows of the visited features are the same direct effects as in the full graph
    full_pos = torch.searchsorted(att.visited, small.visited)
    cols_small = torch.cat([small.visited, torch.arange(att.feat_layer.numel(), att.feat_layer.numel() + att.n_layers * att.T + att.T)])
    cols_full = torch.cat([full_pos, torch.arange(att.visited.numel(), att.visited.numel() + att.n_layers * att.T + att.T)])
    assert cols_small.numel() == cols_full.numel()
    assert torch.allclose(small.adjacency[:20, :cols_small.numel()], att.adjacency[full_pos][:, cols_full], atol=1e-6)


@pytest.mark.slow
def test_graph_on_real_smollm2_with_two_transcoders(smollm2_mlp_run):
    run = smollm2_mlp_run
    assert main(["train", str(run), "--mode", "transcoder", "--name", "tc", "--layers", "0-1", "--arch", "topk", "--k", "16",
                 "--expansion", "2", "--batch-size", "512", "--heldout-fraction", "0", "--progress", "false"]) == 0
    prompt = "The capital of France is"
    # thresholds 1: nothing pruned (with 28 of 30 MLPs frozen as error nodes, pruning would keep mostly errors)
    assert main(["graph", str(run), "--name", "tc", "--prompt", prompt, "--max-feature-nodes", "256",
                 "--node-threshold", "1", "--edge-threshold", "1"]) == 0
    doc = read_graph(layout.graph_path(run, "tc", "the-capital-of-france-is"))
    m = doc["metadata"]
    assert [u["layer"] for u in m["uncovered_layers"]] == list(range(2, 30))  # MLPs 2-29 frozen as error nodes
    lm = load_model("smollm2-135m", "cpu")
    ids = torch.tensor(lm.tokenizer(prompt).input_ids)
    assert m["prompt_ids"] == ids.tolist()
    probs = lm.model(ids[None]).logits[0, -1].softmax(-1)
    top = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert top[0]["feature"] == int(probs.argmax()) and top[0]["token_prob"] == pytest.approx(float(probs.max()), rel=1e-3)
    feats = [n for n in doc["nodes"] if n["feature_type"] == "transcoder"]
    assert feats and {n["layer"] for n in feats} <= {"0", "1"}
    assert 0 < m["influence_kept"] <= 1 and 0 < m["replacement_score"] < 1
    # the replacement on the real model reproduces its logits, and a kept edge is the measured effect
    adapter = TranscoderSet(load_saes(run, "tc"))
    clean = clean_pass(lm.model, ids)
    const, skips, errors = frozen_mlps(adapter, clean)
    base = replacement_forward(lm.model, clean, const, skips, {})[1]
    assert torch.allclose(base[-1], lm.model(ids[None]).logits[0, -1], atol=1e-3)
    feat_ids = {n["node_id"]: n for n in feats}
    link = next(lk for lk in doc["links"] if lk["source"] in feat_ids and lk["target"].startswith("L_"))
    src = feat_ids[link["source"]]
    tok, L = int(link["target"].split("_")[1]), int(src["layer"])
    w = torch.zeros_like(clean.embed_TD)
    w[src["ctx_idx"]] = src["activation"] * adapter.decoder_vectors(L, L, torch.tensor([src["feature"]]))[0]
    moved = replacement_forward(lm.model, clean, const, skips, {L: w})[1]
    measured = float((moved[-1, tok] - moved[-1].mean()) - (base[-1, tok] - base[-1].mean()))
    assert link["weight"] == pytest.approx(measured, rel=1e-2, abs=1e-4)


def test_influence_order_is_the_walk_over_the_normalised_rows():
    """The visiting order's influence: (w_0 + w_1 + ...) A with A the rows' normalised |weights| and each w_{t+1}
    the previous walk step read at the columns of the rows' own features, as the dense definition gives it."""
    from sae.circuits.attribute import _influence_order

    g = torch.Generator().manual_seed(1)
    K, n_rows, n_cols = 3, 40, 700
    rows = torch.randn(K + n_rows, n_cols, generator=g) * (torch.rand(K + n_rows, n_cols, generator=g) < 0.3)
    row_cols = torch.randperm(n_cols, generator=g)[:n_rows]
    rows[K:, row_cols] = rows[K:, row_cols].tril(-1)  # features read only features visited before them: acyclic
    probs = torch.tensor([0.6, 0.3, 0.1])
    a = rows.abs() / rows.abs().sum(1, keepdim=True)
    w, total = torch.cat([probs, torch.zeros(n_rows)]), torch.zeros(n_cols)
    for _ in range(n_rows + 2):
        step = w @ a
        total += step
        w = torch.cat([torch.zeros(K), step[row_cols]])
    assert bool((total[row_cols] > 0).any())
    assert torch.allclose(_influence_order(rows, row_cols, K, probs, n_rows + 2, chunk=7), total, atol=1e-6)
