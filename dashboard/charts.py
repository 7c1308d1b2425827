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
