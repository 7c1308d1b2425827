"""Attention heads of attention-output SAEs (sae/analysis/heads.py): figures and tables built from index arrays,
shared by the Streamlit pages (views/heads_panel.py, views/heads.py) and the static bundle (share.py).

A share is a head's part of the feature's pre-activation on a context (the shares of all heads and of the
constant "bias" term sum to 1); negative shares are heads that push the feature down. Plotly labels hold only
numbers and head names: token text goes into HTML built by dashboard/render.py, which escapes it.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from markupsafe import Markup

from dashboard.render import context_html, grid

LAYOUT = {"margin": {"l": 40, "r": 10, "t": 36, "b": 36}, "height": 300, "template": "plotly_white"}
SHARE_SCALE = "RdBu"  # reversed below: red = the head writes the feature, blue = it pushes it down


def has_heads(rec: dict) -> bool:
    return "head_share" in rec


def head_names(n_heads: int) -> list[str]:
    return [f"h{h}" for h in range(n_heads)]


def mean_share_figure(share_LH: np.ndarray, bias_L: np.ndarray, counts_L: np.ndarray, layers: list[int]) -> go.Figure:
    """One group of bars per layer that has top contexts: each head's mean share, and the constant's."""
    names = [*head_names(share_LH.shape[1]), "bias"]
    fig = go.Figure()
    for layer, share, bias, n in zip(layers, share_LH, bias_L, counts_L):
        if n > 0:
            fig.add_trace(go.Bar(x=names, y=[*share.tolist(), float(bias)], name=f"layer {layer} ({int(n)} contexts)"))
    fig.update_layout(title="mean share of the pre-activation per head (top contexts)", barmode="group",
                      yaxis_title="share", showlegend=True, **LAYOUT)
    return fig


def context_labels(values: np.ndarray, slots: np.ndarray, layers: list[int], multilayer: bool) -> list[str]:
    return [f"#{i + 1} · {float(v):.3g}" + (f" @ L{layers[int(s)]}" if multilayer else "")
            for i, (v, s) in enumerate(zip(values, slots))]


def contexts_figure(top_KH: np.ndarray, bias_K: np.ndarray, labels: list[str]) -> go.Figure:
    """Top contexts (rows, strongest first, numbered as in the list of top activations) x heads and bias."""
    z = np.concatenate([top_KH, bias_K[:, None]], axis=1)
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(z=z, x=[*head_names(top_KH.shape[1]), "bias"], y=labels, colorscale=SHARE_SCALE,
                               reversescale=True, zmid=0, zmin=-lim, zmax=lim, colorbar={"title": "share"},
                               hovertemplate="%{y}, %{x}: share %{z:.3f}<extra></extra>"))
    fig.update_layout(title="share per head on each top context", **{**LAYOUT, "height": 120 + 22 * len(labels)})
    fig.update_yaxes(autorange="reversed", type="category")
    return fig


def contexts_table(rec: dict, token_str, labels: list[str], limit: int = 10) -> Markup:
    """The first `limit` top contexts as escaped token windows beside each head's share on them."""
    ok = np.nonzero(rec["top_row"] >= 0)[0][:limit]
    H = rec["top_head_share"].shape[1]
    rows = [[labels[i], context_html(rec["top_tokens"][k], rec["top_acts"][k], token_str, float(rec["max_act"])),
             *[f"{float(s):+.2f}" for s in rec["top_head_share"][k]], f"{float(rec['top_head_bias_share'][k]):+.2f}"]
            for i, k in enumerate(ok)]
    return grid(["context", "tokens", *head_names(H), "bias"], rows)


def feature_heads(rec: dict, layers: list[int], multilayer: bool, token_str) -> dict | None:
    """Everything the feature page shows about heads: the main head line, two figures and the table."""
    if not has_heads(rec) or not (rec["head_contexts"] > 0).any():
        return None
    share, counts = rec["head_share"], rec["head_contexts"]
    ok = np.nonzero(rec["top_row"] >= 0)[0]
    labels = context_labels(rec["top_value"][ok], rec["top_slot"][ok], layers, multilayer)
    best_l = int(np.argmax(counts))
    h = int(np.nanargmax(share[best_l]))
    main = (f"head {h} of layer {layers[best_l]} writes the largest mean share, {float(share[best_l, h]):.0%}, "
            f"over {int(counts[best_l])} top contexts")
    return {"main": main,
            "figures": [mean_share_figure(share, rec["head_bias_share"], counts, layers),
                        contexts_figure(rec["top_head_share"][ok], rec["top_head_bias_share"][ok], labels)],
            "table": contexts_table(rec, token_str, labels)}


def layer_summary(share_NH: np.ndarray, count_N: np.ndarray, frequency_N: np.ndarray, limit: int = 400) -> dict:
    """Heads x features at one layer: the `limit` most frequent features with top contexts there, grouped by the
    head with the largest share (then by that share); how many features each head writes most; each head's
    strongest features."""
    alive = np.nonzero(count_N > 0)[0]
    alive = alive[np.argsort(-frequency_N[alive], kind="stable")[:limit]]
    main = np.nanargmax(share_NH[alive], axis=1) if len(alive) else np.zeros(0, dtype=int)
    top = share_NH[alive, main] if len(alive) else np.zeros(0)
    order = np.lexsort((-top, main))
    H = share_NH.shape[1]
    strongest = {h: [(int(f), float(share_NH[f, h])) for f in alive[np.argsort(-share_NH[alive, h])[:5]]]
                 for h in range(H)} if len(alive) else {h: [] for h in range(H)}
    return {"features": alive[order], "share": share_NH[alive[order]],
            "main_counts": np.bincount(main, minlength=H), "strongest": strongest}


def heads_features_figure(share_FH: np.ndarray, feature_ids: np.ndarray, title: str) -> go.Figure:
    lim = float(np.nanmax(np.abs(share_FH))) if np.isfinite(share_FH).any() else 1.0
    fig = go.Figure(go.Heatmap(z=share_FH, x=head_names(share_FH.shape[1]), y=[str(int(i)) for i in feature_ids],
                               colorscale=SHARE_SCALE, reversescale=True, zmid=0, zmin=-lim, zmax=lim,
                               colorbar={"title": "share"},
                               hovertemplate="feature %{y}, %{x}: mean share %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="feature", **{**LAYOUT, "height": 520})
    fig.update_yaxes(showticklabels=len(feature_ids) <= 60, type="category")
    return fig


def main_head_figure(counts_H: np.ndarray, title: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=head_names(len(counts_H)), y=counts_H, marker_color="#dc2626"))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="features", **LAYOUT)
    return fig
