"""`strata graph RUN --name N --prompt "..."`: the attribution graph of one prompt on a run's transcoders or CLT.

A CLT feature is a node at its encoder (source) layer, as circuit-tracer places it; its outgoing edges carry the
writes of all its decoders (into that layer's MLP output and every later covered one). Its `feature` number is
the CLT's own (layer block s starts at s x latents per layer), the number the feature index and Features page use.

Layers without a transcoder: their MLP output is frozen at its clean value and appears as one error node per
position ("mlp reconstruction error" holding the whole MLP output), so the replacement still reproduces the clean
logits exactly; metadata.uncovered_layers lists them. A prompt longer than the transcoders' training context is
refused (their features were never trained on later positions). Likewise the first positions that training left
out of every context (`--exclude-first`, default 1: the attention sink): there every MLP output is frozen at its
clean value (held by that position's error nodes) and no feature is a node, as circuit-tracer treats BOS;
metadata.untrained_positions records it.
"""
from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from annotated_types import Ge, Gt, Interval

from activations import layout
from activations.config import option as _f
from activations.errors import StrataError
from activations.lock import run_lock
from activations.manifest import load_manifest, software_versions

UNCOVERED = "MLP output frozen at its clean value: one error node per position holds all of it"
UNTRAINED = ("positions the transcoders never trained on (training's exclude_first): every MLP output there is "
             "frozen at its clean value, held by the error node, and no feature is a node")


@dataclass
class GraphConfig:
    run_dir: str = _f("runs/default", "run directory with train/<name> (transcoders or a CLT)", cli=False)
    name: str = _f("", "training run whose transcoders or CLT replace the MLPs (RUN/train/<name>)")
    prompt: str = _f("", "the prompt to explain (its last position's top logits are the graph's outputs)")
    graph_name: str = _f("", "graph file name: RUN/graphs/<name>/<graph-name>.json (default: a slug of the prompt)")
    max_feature_nodes: Annotated[int, Gt(0)] = _f(2048, "features whose inputs are computed (most influential first)")
    max_logits: Annotated[int, Gt(0)] = _f(10, "at most this many output logits")
    logit_coverage: Annotated[float, Interval(gt=0, le=1)] = _f(0.95, "top logits until their probability sums to this")
    node_threshold: Annotated[float, Interval(gt=0, le=1)] = _f(0.8, "keep the nodes holding this share of the influence")
    edge_threshold: Annotated[float, Interval(gt=0, le=1)] = _f(0.98, "then the edges holding this share")
    pin: str = _f("", "features always kept: LAYER:FEATURE[@POS], comma separated (e.g. 3:17,5:2@4); FEATURE as "
                      "the graph's nodes number it")
    batch_size: Annotated[int, Gt(0)] = _f(32, "targets per batched backward pass")
    threads: Annotated[int, Ge(0)] = _f(0, "CPU threads (0 = torch's default)")
    overwrite: bool = _f(False, "replace an existing graph of the same name")


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:48].strip("-")
    return s or "graph"


def parse_pins(spec: str) -> list[tuple[int, int, int | None]]:
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        m = re.fullmatch(r"(\d+):(\d+)(?:@(\d+))?", part)
        if not m:
            raise StrataError(f"bad --pin {part!r}; write LAYER:FEATURE or LAYER:FEATURE@POS, e.g. 3:17@4")
        out.append((int(m.group(1)), int(m.group(2)), int(m.group(3)) if m.group(3) else None))
    return out


def _check_harvest(run, manifest) -> None:
    sites = {k.rpartition(".")[0] for k in manifest.keys}
    missing = [s for s in ("mlp_in", "mlp_out") if s not in sites]
    if missing:
        have = ",".join(sorted(sites | {"mlp_in", "mlp_out"}))
        raise StrataError(f"the harvest in {run} has no {' or '.join(missing)} keys, which transcoders and CLTs read "
                          f"and predict: harvest with `strata harvest {run} --sites {have}`, then train with "
                          f"`--mode transcoder` or `--mode clt`")


def _uncovered(adapter, L: int) -> str:
    return f"layer {L} is not one of the CLT's layers" if adapter.mode == "clt" else f"layer {L} has no transcoder"


def _pinned(pins, adapter, feats) -> torch.Tensor:
    layer, pos, idx = feats[:3]
    out = []
    for L, i, p in pins:
        if L not in adapter.layers:
            raise StrataError(f"--pin {L}:{i}: {_uncovered(adapter, L)}; pin features of layers {adapter.layers}")
        first, n = adapter.feature_offset(L), adapter.n_latents(L)
        if not first <= i < first + n:
            raise StrataError(f"--pin {L}:{i}: feature {i} does not exist in {adapter.sae_id(L)} at layer {L} "
                              f"({first}-{first + n - 1}); pick one in range")
        hit = (layer == L) & (idx == i - first) & ((pos == p) if p is not None else True)
        if not bool(hit.any()):
            where = f" at position {p}" if p is not None else ""
            raise StrataError(f"--pin {L}:{i}: feature {i} of {adapter.sae_id(L)} does not fire{where} on this prompt; "
                              f"pin a feature that is active")
        out.append(hit.nonzero().squeeze(1))
    return torch.cat(out).unique() if out else torch.zeros(0, dtype=torch.long)


def _explanations(run, name: str, adapter) -> dict:
    from sae.analysis.index_file import FeatureIndex

    path = layout.index_path(run, name)
    if not path.is_file():
        return {}
    try:
        idx = FeatureIndex(path)
    except StrataError:
        return {}
    try:
        out = {}  # sae id -> explanation per feature number
        for sid in {adapter.sae_id(L) for L in adapter.layers}:
            if sid in idx.sae_ids and idx.has(sid, "explanation"):
                out[sid] = idx.column(sid, "explanation")
        return out
    finally:
        idx.close()


def make_graph(cfg: GraphConfig):
    """Validate everything, then build, prune and write the graph; returns (path, metadata)."""
    from activations.model import load_model
    from sae.checkpoint import load_saes
    from sae.circuits.adapter import adapter_for
    from sae.circuits.attribute import active_features, attribute
    from sae.circuits.frozen import check_architecture, clean_pass
    from sae.circuits.graph_file import read_graph, write_graph
    from sae.train_folder import read_config

    t0 = time.perf_counter()
    run = cfg.run_dir
    if not cfg.name:
        raise StrataError("say which training run's transcoders or CLT to use: --name <train name>")
    if not cfg.prompt.strip():
        raise StrataError("give the prompt to explain: --prompt \"...\"")
    graph_name = cfg.graph_name or slug(cfg.prompt)
    path = layout.graph_path(run, cfg.name, graph_name)
    if path.exists() and not cfg.overwrite:
        raise StrataError(f"graph {path} exists; pick another --graph-name or pass --overwrite")
    if path.exists():
        read_graph(path)  # --overwrite replaces only a graph Strata wrote
    manifest = load_manifest(run)
    _check_harvest(run, manifest)
    pins = parse_pins(cfg.pin)
    saved = read_config(layout.train_dir(run, cfg.name))  # a damaged config.json: one line naming it
    exclude_first = int(saved["identity"].get("exclude_first", 0)) if saved is not None else 0
    for L, i, p in pins:
        if p is not None and p < exclude_first:
            raise StrataError(f"--pin {L}:{i}@{p}: position {p} is one of the first {exclude_first} that {cfg.name} "
                              f"trained without (--exclude-first), so it has no feature nodes; pin a feature at "
                              f"position {exclude_first} or later")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cpu")  # the attribution runs on the CPU (the graph's matrices live there)
    adapter = adapter_for(load_saes(run, cfg.name, device))
    lm = load_model(manifest.model["id"], device, torch.float32)
    check_architecture(lm.model)
    ids = torch.tensor(lm.tokenizer(cfg.prompt).input_ids, dtype=torch.long, device=device)
    limit = adapter.context_length() or manifest.context_length
    if ids.numel() > limit:
        what = "CLT of {} was" if adapter.mode == "clt" else "transcoders of {} were"
        raise StrataError(f"the prompt is {ids.numel()} tokens but the {what.format(cfg.name)} trained on "
                          f"{limit}-token contexts (positions beyond are untrained); shorten the prompt to at most "
                          f"{limit} tokens. Nothing was written")
    with run_lock(run, f"strata graph --name {cfg.name}", scope=f"graph-{cfg.name}"):
        clean = clean_pass(lm.model, ids)
        feats = active_features(adapter, clean, exclude_first)
        pinned_feats = _pinned(pins, adapter, feats) if pins else None
        att = attribute(lm.model, clean, adapter, cfg.max_feature_nodes, cfg.max_logits, cfg.logit_coverage,
                        cfg.batch_size, must_visit=pinned_feats, exclude_first=exclude_first)
        doc = assemble(att, lm, clean, adapter, cfg, _explanations(run, cfg.name, adapter), pinned_feats)
        n_layers = att.n_layers
        meta = dict(doc["metadata"], slug=graph_name, scan=f"strata:{Path(run).resolve().name}/{cfg.name}",
                    prompt=cfg.prompt, model=manifest.model["id"], train=cfg.name,
                    saes=[adapter.sae_id(L) for L in adapter.layers], mode=adapter.mode,
                    uncovered_layers=[{"layer": L, "treatment": UNCOVERED} for L in range(n_layers)
                                      if L not in adapter.layers],
                    untrained_positions={"exclude_first": exclude_first,
                                         "positions": list(range(min(exclude_first, ids.numel()))),
                                         "treatment": UNTRAINED},
                    node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold,
                    seconds=round(time.perf_counter() - t0, 3),
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    strata_version=software_versions().get("saestrata", "dev"))
        write_graph(path, meta, doc["nodes"], doc["links"], doc["pinned"])
    return path, meta


def assemble(att, lm, clean, adapter, cfg: GraphConfig, clerps: dict, pinned_feats) -> dict:
    """Prune the attribution and turn the kept nodes and edges into the JSON's nodes and links."""
    from sae.circuits.graph_file import node
    from sae.circuits.prune import graph_scores, prune

    T, n_layers, K = att.T, att.n_layers, att.logit_ids.numel()
    Fv = att.visited.numel()
    n_err = n_layers * T
    pinned_nodes = None
    if pinned_feats is not None:
        pinned_nodes = torch.searchsorted(att.visited, pinned_feats)
    pr = prune(att.adjacency, att.logit_probs, Fv, T, cfg.node_threshold, cfg.edge_threshold, pinned_nodes)
    replacement, completeness = graph_scores(att.adjacency, att.logit_probs, Fv, n_err)
    tok = lm.tokenizer
    ids = clean.ids.tolist()
    nodes = []
    kind = "cross layer transcoder" if adapter.mode == "clt" else "transcoder"
    for j, f in enumerate(att.visited.tolist()):
        L, p = int(att.feat_layer[f]), int(att.feat_pos[f])
        sid, i = adapter.sae_id(L), adapter.feature_offset(L) + int(att.feat_idx[f])
        clerp = str(clerps[sid][i]) if sid in clerps and i < len(clerps[sid]) else ""
        nodes.append(node(kind, str(L), i, p, sae=sid, activation=float(att.feat_act[f]),
                          influence=float(pr.influence[j]), clerp=clerp))
    for L in range(n_layers):
        for p in range(T):
            nodes.append(node("mlp reconstruction error", str(L), -1, p,
                              activation=float(att.error_vectors[L, p].norm()),
                              influence=float(pr.influence[Fv + L * T + p])))
    for p in range(T):
        nodes.append(node("embedding", "E", ids[p], p, influence=float(pr.influence[Fv + n_err + p])))
    for k in range(K):
        t = int(att.logit_ids[k])
        nodes.append(node("logit", str(n_layers), t, T - 1, token_prob=float(att.logit_probs[k]),
                          clerp=f"output {tok.decode([t])!r} (p={float(att.logit_probs[k]):.3f})"))
    for n in nodes:
        if n["feature_type"] == "embedding":
            n["node_id"] = f"E_{n['feature']}_{n['ctx_idx']}"
        elif n["feature_type"] == "logit":
            n["node_id"] = f"L_{n['feature']}_{n['ctx_idx']}"
    keep = pr.node_mask.nonzero().squeeze(1).tolist()
    tgt, src = pr.edge_mask.nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(att.adjacency[t, s])}
             for t, s in zip(tgt.tolist(), src.tolist())]
    kept_nodes = [nodes[j] for j in keep]
    pinned = [nodes[int(j)]["node_id"] for j in pinned_nodes] if pinned_nodes is not None else []
    meta = {"prompt_tokens": [tok.decode([t]) for t in ids], "prompt_ids": ids, "influence_kept": pr.influence_kept,
            "replacement_score": replacement, "completeness_score": completeness,
            "n_nodes_before": len(nodes), "n_edges_before": int((att.adjacency != 0).sum()),
            "n_active_features": int(att.feat_layer.numel()), "max_feature_nodes": cfg.max_feature_nodes}
    return {"metadata": meta, "nodes": kept_nodes, "links": links, "pinned": pinned}
