"""Plotly figures, built from index arrays and run files only (shared by the app and the static bundle)."""
from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

LAYOUT = {"margin": {"l": 40, "r": 10, "t": 36, "b": 36}, "height": 300, "template": "plotly_white"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def training_series(rows: list[dict], metric: str) -> dict[str, tuple[list, list]]:
    """(steps, values) per line of `metric` from metrics.jsonl rows as sae/train.py logs them:
    {"step", "tokens", "lr", "tokens_per_s", "saes": {sae_id: {"loss", "fvu", "l0", "frac_dead", ...,
    "fvu/<key>" for an SAE that reads several keys}}}. A per-SAE metric gives one line per SAE; a run-wide one
    (lr, tokens_per_s) one line named after it."""
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        step = r.get("step")
        lines = {sid: m.get(metric) for sid, m in r.get("saes", {}).items() if isinstance(m, dict)}
        lines[metric] = r.get(metric)
        for name, v in lines.items():
            if _number(v) and _number(step):
                xs, ys = series.setdefault(name, ([], []))
                xs.append(step)
                ys.append(v)
    return series


def training_curves(rows: list[dict], metric: str) -> go.Figure:
    """One line per SAE (or one line, for a run-wide metric) of `metric` against step."""
    fig = go.Figure()
    for name, (x, y) in sorted(training_series(rows, metric).items()):
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=name))
    fig.update_layout(title=metric, xaxis_title="step", **LAYOUT)
    return fig


def numeric_metrics(rows: list[dict]) -> list[str]:
    """Every metric a curve can be drawn of: the per-SAE ones and the run-wide ones except step and tokens."""
    names = set()
    for r in rows:
        names.update(k for k, v in r.items() if _number(v) and k not in ("step", "tokens"))
        for m in r.get("saes", {}).values():
            if isinstance(m, dict):
                names.update(k for k, v in m.items() if _number(v))
    return sorted(names)


def density_histogram(freqs: dict[str, np.ndarray]) -> go.Figure:
    """log10 firing frequency of every feature, one trace per SAE (dead features at the left edge)."""
    fig = go.Figure()
    for sid, f in freqs.items():
        fig.add_trace(go.Histogram(x=np.log10(np.maximum(f, 1e-10)), name=sid, opacity=0.6, nbinsx=60))
    fig.update_layout(barmode="overlay", title="feature density", xaxis_title="log10 firing frequency (-10 = never)", **LAYOUT)
    return fig


def activation_histogram(counts: np.ndarray, hi: float) -> go.Figure:
    edges = np.linspace(0, hi, len(counts) + 1)
    last = int(np.nonzero(counts)[0].max()) + 1 if counts.any() else len(counts)
    fig = go.Figure(go.Bar(x=(edges[:-1] + edges[1:])[:last] / 2, y=counts[:last], width=(edges[1] - edges[0]),
                           marker_color="#f97316"))
    fig.update_layout(title="activations (non-zero)", xaxis_title="activation", yaxis_title="count", **LAYOUT)
    return fig


def layer_profile(layers: list[int], mass: np.ndarray, title="activation mass per layer") -> go.Figure:
    fig = go.Figure(go.Bar(x=[str(x) for x in layers], y=mass, marker_color="#7c3aed"))
    fig.update_layout(title=title, xaxis_title="layer", **LAYOUT)
    return fig


def feature_layer_heatmap(mass: np.ndarray, layers: list[int], feature_ids: np.ndarray) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=mass, x=[str(x) for x in layers], y=[str(i) for i in feature_ids],
                               colorscale="Viridis", colorbar={"title": "mass"}))
    fig.update_layout(title="features x layers (sorted by mean layer)", xaxis_title="layer",
                      yaxis_title="feature", **{**LAYOUT, "height": 520})
    fig.update_yaxes(showticklabels=len(feature_ids) <= 60, type="category")
    return fig


def residual_similarity(rows: list[dict]) -> go.Figure:
    x = [f"{r['a']}→{r['b']}" for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=[r["cos_centred"] for r in rows], mode="lines+markers", name="centred"))
    fig.add_trace(go.Scatter(x=x, y=[r["cos_raw"] for r in rows], mode="lines+markers", name="raw"))
    fig.update_layout(title="residual stream: cosine between adjacent layers", yaxis_title="mean cosine", **LAYOUT)
    return fig


AGREE_COLOURS = ["rgba(148, 163, 184, 0.45)", "rgba(148, 163, 184, 0.55)", "rgba(96, 165, 250, 0.6)",
                 "rgba(37, 99, 235, 0.65)", "rgba(30, 58, 138, 0.75)"]  # by how many methods agree: 0 .. 4


def short(text: str, n: int = 32) -> str:
    """Corpus text for a plotly label: one line, at most n characters, escaped (plotly reads a few HTML tags in
    labels and hover text and shows entities as their characters, so the text stays text)."""
    text = " ".join(str(text).split())
    return html.escape(text if len(text) <= n else text[:n - 1] + "…")


def flow_figure(flow, hrefs: list[str] | None = None) -> go.Figure:
    """A layered Sankey of a dashboard.flow_graph.Flow: one column per SAE in depth order, nodes labelled with
    their explanation and density, link width = causal effect (activation correlation for older indexes),
    link colour = how many methods agree. `hrefs` (one per node) go into the nodes' customdata."""
    nodes, links = flow.nodes, flow.links
    n_cols = max(len(flow.columns), 2)
    x = [0.01 + 0.98 * c / (n_cols - 1) for c in nodes["column"]]
    y = np.zeros(len(nodes))
    for c in range(len(flow.columns)):
        rows = np.nonzero(nodes["column"].to_numpy() == c)[0]
        y[rows] = 0.01 + 0.98 * (np.arange(len(rows)) + 0.5) / max(len(rows), 1)
    labels = [" ".join([f"#{f}", *([short(e)] if e else []), f"· {d:.1e}"]) for f, e, d in
              zip(nodes["feature"], nodes["explanation"], nodes["density"])]
    hover = [f"{s} #{f}<br>{short(e, 80)}<br>density {d:.2e}" for s, f, e, d in
             zip(nodes["sae"], nodes["feature"], nodes["explanation"], nodes["density"])]
    n_agree = [bin(int(a)).count("1") for a in links["agree"]]
    what = "causal effect" if flow.causal else "act. corr"
    link_hover = [f"{u} #{int(i)} → {d} #{int(j)}<br>{what} {w:.3f}<br>methods agreeing: {n}"
                  for u, i, d, j, w, n in zip(links["up"], links["i"], links["down"], links["j"], links["weight"],
                                              n_agree)]
    fig = go.Figure(go.Sankey(
        arrangement="fixed",  # nodes stay where depth puts them (and a click is a click, not a drag)
        node={"label": labels, "x": x, "y": y.tolist(), "pad": 6, "thickness": 12, "color": "#7c3aed",
              "customdata": [[h, t] for h, t in zip(hrefs or [""] * len(nodes), hover)],
              "hovertemplate": "%{customdata[1]}<extra></extra>"},
        link={"source": links["src"].tolist(), "target": links["dst"].tolist(),
              "value": np.maximum(links["weight"].to_numpy(dtype=float), 1e-3).tolist(),
              "color": [AGREE_COLOURS[min(n, 4)] for n in n_agree], "customdata": link_hover,
              "hovertemplate": "%{customdata}<extra></extra>"}))
    for c, sid in enumerate(flow.columns):
        fig.add_annotation(x=0.01 + 0.98 * c / (n_cols - 1), y=1.06, xref="paper", yref="paper", text=sid,
                           showarrow=False, font={"size": 12})
    fig.update_layout(title=f"flow of features through depth (width = {what}, colour = methods agreeing)",
                      **{**LAYOUT, "height": max(420, 16 * int(np.bincount(nodes["column"]).max()
                                                              if len(nodes) else 0)),
                         "margin": {"l": 10, "r": 10, "t": 70, "b": 10}})
    return fig


def frontier(points: list[dict], front: list[dict], x: str = "L0", y: str = "FVU") -> go.Figure:
    """Points {"train", "sae", "x", "y"} and the Pareto front among them; x and y name the axes."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[p["x"] for p in points], y=[p["y"] for p in points], mode="markers",
                             text=[f"{p['train']}/{p['sae']}" for p in points], name="SAEs"))
    fig.add_trace(go.Scatter(x=[p["x"] for p in front], y=[p["y"] for p in front], mode="lines", name="frontier"))
    log_x = all(p["x"] > 0 for p in points) and x == "L0"
    fig.update_layout(title=f"{x}-{y} frontier", xaxis_title=x, yaxis_title=y, xaxis_type="log" if log_x else "linear",
                      **LAYOUT)
    return fig


# ---------------------------------------------------------------- attribution graph (the Circuits page)
PINNED_EDGE = "#dc2626"
NODE_COLOURS = {"embedding": "#64748b", "mlp reconstruction error": "#cbd5e1", "transcoder": "#7c3aed",
                "cross layer transcoder": "#7c3aed", "logit": "#16a34a"}


def graph_layer(node: dict, n_layers: int) -> float:
    """y of a node: embeddings (layer "E") at -1, features and errors at their layer, logits at n_layers."""
    layer = str(node["layer"])
    return -1.0 if layer == "E" else float(layer) if layer.lstrip("-").isdigit() else float(n_layers)


def node_label(node: dict) -> str:
    """A node's short name: its explanation when it has one, else what it is."""
    kind = node["feature_type"]
    if node.get("clerp"):
        return str(node["clerp"])
    if kind == "embedding":
        return "emb"
    if kind == "logit":
        return f"logit {node['feature']}"
    if kind == "mlp reconstruction error":
        return f"err L{node['layer']}"
    return f"L{node['layer']} #{node['feature']}"


def influence_rank(node: dict) -> float:
    """Sort key, most influential first: a node's `influence` is circuit-tracer's cumulative score (the running
    share of the total influence, smallest for the most influential node); a node without one comes last."""
    score = float(node.get("influence") or 0)
    return score if score > 0 else 2.0


def pinned_ids(graph: dict) -> list[str]:
    return list((graph.get("qParams") or {}).get("pinnedIds") or [])


def filter_by_influence(graph: dict, threshold: float) -> dict:
    """The graph with only the nodes whose cumulative influence is at most `threshold` (embeddings, logits, nodes
    without a score and the pinned nodes always kept) and the links between kept nodes."""
    pinned = set(pinned_ids(graph))
    keep = [n for n in graph["nodes"] if n["feature_type"] in ("embedding", "logit") or n["node_id"] in pinned
            or not float(n.get("influence") or 0) > 0 or float(n["influence"]) <= threshold]
    ids = {n["node_id"] for n in keep}
    links = [ln for ln in graph["links"] if ln["source"] in ids and ln["target"] in ids]
    return {**graph, "nodes": keep, "links": links}


def circuit_cells(graph: dict) -> dict[tuple, list[dict]]:
    """(layer y, token position) -> the nodes in that cell, error nodes first, then most influential first."""
    nodes = graph["nodes"]
    n_layers = max([int(n["layer"]) for n in nodes if str(n["layer"]).isdigit()
                    and n["feature_type"] == "logit"] or [0])
    cells: dict[tuple, list[dict]] = {}
    for n in nodes:
        cells.setdefault((graph_layer(n, n_layers), int(n["ctx_idx"])), []).append(n)
    return {cell: sorted(members, key=lambda n: (n["feature_type"] != "mlp reconstruction error", influence_rank(n)))
            for cell, members in cells.items()}


def circuit_positions(graph: dict) -> dict[str, tuple[float, float]]:
    """node_id -> (x, y): x = token position (nodes sharing a layer and position spread side by side within
    it), y = layer (embeddings at the bottom, logits at the top)."""
    pos = {}
    for (y, x), members in circuit_cells(graph).items():
        width = min(0.8, 0.16 * len(members))
        for i, n in enumerate(members):
            dx = 0.0 if len(members) == 1 else -width / 2 + width * i / (len(members) - 1)
            pos[n["node_id"]] = (x + dx, y)
    return pos


def circuit_labels(graph: dict, always: set[str]) -> dict[str, str]:
    """node_id -> the text drawn beside it. One label per cell, so a crowded cell stays legible: its most
    influential feature's (or its node's, in a cell without features), with "+N" for the others (their names are on
    hover); the nodes in `always` (selected, pinned) keep theirs."""
    labels = {}
    for members in circuit_cells(graph).values():
        feats = [n for n in members if n["feature_type"] != "mlp reconstruction error"]
        lead = min(feats or members, key=influence_rank)
        rest = len(members) - 1
        for n in members:
            if n is lead:
                labels[n["node_id"]] = short(node_label(n), 24) + (f" (+{rest})" if rest else "")
            else:
                labels[n["node_id"]] = short(node_label(n), 24) if n["node_id"] in always else ""
    return labels


MAX_LINKS = 3000  # a browser draws ~300k plotly line segments in tens of seconds, 3,000 in a blink


def drawable_links(links: list[dict], max_links: int = MAX_LINKS) -> list[dict]:
    """At most `max_links` links: those carrying the largest share of their target's input (|weight| over the
    sum of |weights| into the target, the normalisation graph pruning uses), so every node keeps its main inputs."""
    if len(links) <= max_links:
        return links
    into: dict[str, float] = {}
    for ln in links:
        into[ln["target"]] = into.get(ln["target"], 0.0) + abs(ln["weight"])
    return sorted(links, key=lambda ln: -abs(ln["weight"]) / (into[ln["target"]] or 1.0))[:max_links]


def strongest_links(graph: dict, node_id: str, top: int = 5) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of a node: the links into and out of it with the largest |weight|, at most `top` each."""
    ins = [ln for ln in graph["links"] if ln["target"] == node_id]
    outs = [ln for ln in graph["links"] if ln["source"] == node_id]
    return (sorted(ins, key=lambda ln: -abs(ln["weight"]))[:top], sorted(outs, key=lambda ln: -abs(ln["weight"]))[:top])


def circuit_figure(graph: dict, selected: str | None = None, hover: dict | None = None,
                   hrefs: dict | None = None) -> go.Figure:
    """The pruned graph laid out by token position (x) and layer (y); links as lines (width ~ |weight|, blue
    excites, red inhibits); nodes labelled with their explanation; supernodes boxed and named; pinned nodes
    (qParams.pinnedIds) drawn as red-edged diamonds. With a node `selected`, only its strongest inputs and outputs
    are drawn, the rest of the graph faded (pinned nodes stay lit); otherwise at most MAX_LINKS links, the
    strongest for their targets (drawable_links). `hover`: node_id ->
    extra hover text (e.g. top contexts, already escaped); `hrefs`: node_id -> link put into the customdata."""
    hover, hrefs = hover or {}, hrefs or {}
    pos = circuit_positions(graph)
    by_id = {n["node_id"]: n for n in graph["nodes"]}
    links = drawable_links([ln for ln in graph["links"] if ln["source"] in pos and ln["target"] in pos])
    pinned = set(pinned_ids(graph)) & set(by_id)
    lit: set[str] = set()
    if selected in by_id:
        ins, outs = strongest_links(graph, selected)
        links = ins + outs
        lit = {selected} | {ln["source"] for ln in ins} | {ln["target"] for ln in outs} | pinned
    w_max = max((abs(ln["weight"]) for ln in links), default=1.0) or 1.0
    fig = go.Figure()
    bins: dict[tuple, tuple[list, list]] = {}
    for ln in links:
        width = 1 + round(4 * abs(ln["weight"]) / w_max)  # five widths, so each is one trace
        xs, ys = bins.setdefault((ln["weight"] >= 0, width), ([], []))
        (x0, y0), (x1, y1) = pos[ln["source"]], pos[ln["target"]]
        xs += [x0, x1, None]
        ys += [y0, y1, None]
    for (positive, width), (xs, ys) in sorted(bins.items()):
        colour = "rgba(37, 99, 235, 0.55)" if positive else "rgba(220, 38, 38, 0.55)"
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"width": width, "color": colour}, hoverinfo="skip",
                                 showlegend=False))
    member_of = {i: s[0] for s in graph.get("qParams", {}).get("supernodes", []) for i in s[1:]}
    ids = list(pos)
    nodes = [by_id[i] for i in ids]
    faded = bool(lit)
    labels = circuit_labels(graph, pinned | ({selected} if selected else set()))
    fig.add_trace(go.Scatter(
        x=[pos[i][0] for i in ids], y=[pos[i][1] for i in ids], mode="markers+text",
        text=[labels[i] for i in ids], textposition="top center", textfont={"size": 10},
        marker={"size": [16 if n["node_id"] == selected else 14 if n["node_id"] in pinned else 11 for n in nodes],
                "symbol": ["diamond" if n["node_id"] in pinned else "circle" for n in nodes],
                "color": [NODE_COLOURS.get(n["feature_type"], "#7c3aed") for n in nodes],
                "opacity": [1.0 if not faded or n["node_id"] in lit else 0.25 for n in nodes],
                "line": {"width": [3 if n["node_id"] in member_of or n["node_id"] in pinned else 1 for n in nodes],
                         "color": [PINNED_EDGE if n["node_id"] in pinned else "#f59e0b" if n["node_id"] in member_of
                                   else "#1e293b" for n in nodes]}},
        customdata=[[n["node_id"], hrefs.get(n["node_id"], "")] for n in nodes],
        hovertext=[_node_hover(n, member_of.get(n["node_id"]), hover.get(n["node_id"], ""), n["node_id"] in pinned)
                   for n in nodes],
        hovertemplate="%{hovertext}<extra></extra>", showlegend=False, name="nodes"))
    for label, *members in graph.get("qParams", {}).get("supernodes", []):
        pts = [pos[i] for i in members if i in pos]
        if pts:
            x0, x1 = min(p[0] for p in pts) - 0.3, max(p[0] for p in pts) + 0.3
            y0, y1 = min(p[1] for p in pts) - 0.3, max(p[1] for p in pts) + 0.3
            fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, line={"color": "#f59e0b", "dash": "dot"})
            fig.add_annotation(x=(x0 + x1) / 2, y=y1, text=short(label, 30), showarrow=False, yshift=8,
                               font={"color": "#b45309", "size": 11})
    meta = graph.get("metadata", {})
    tokens = meta.get("prompt_tokens") or []
    layers = sorted({pos[i][1] for i in ids})
    fig.update_layout(
        title=short(f"{meta.get('slug', '')}: {meta.get('prompt', '')}", 90),
        xaxis={"tickmode": "array", "tickvals": list(range(len(tokens))),
               "ticktext": [short(t, 12) for t in tokens], "title": "token position"},
        yaxis={"tickmode": "array", "tickvals": layers,
               "ticktext": ["E" if y < 0 else ("logits" if any(by_id[i]["feature_type"] == "logit" and pos[i][1] == y
                                                                for i in ids) else f"{int(y)}") for y in layers],
               "title": "layer"},
        **{**LAYOUT, "height": max(420, 60 * len(layers))})
    return fig


def _node_hover(node: dict, supernode: str | None, extra: str, pinned: bool = False) -> str:
    kind = node["feature_type"]
    lines = [f"<b>{short(node_label(node), 80)}</b>", f"{kind} · layer {node['layer']} · position {node['ctx_idx']}"]
    if kind in ("transcoder", "cross layer transcoder"):
        lines.append(f"{short(node.get('sae', ''), 40)} #{node['feature']} · activation {float(node.get('activation') or 0):.3g}")
    if kind == "logit":
        lines.append(f"token {node['feature']} · p = {float(node.get('token_prob') or 0):.3f}")
    if kind != "logit":
        lines.append(f"cumulative influence {float(node.get('influence') or 0):.3g}")
    if pinned:
        lines.append("pinned")
    if supernode:
        lines.append(f"supernode: {short(supernode, 40)}")
    return "<br>".join(lines + ([extra] if extra else []))
