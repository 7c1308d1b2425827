"""One feature's page: every item the index stores for it."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import cache, charts
from dashboard.render import contexts_html, feature_link, grid, visible_token
from dashboard.views.common import Ctx, html
from dashboard.views.heads_panel import render_heads
from dashboard.views.lineage import lineage_panel


def example_labels(values, slots, layers: list[int], multilayer: bool) -> list[str]:
    if multilayer:
        return [f"{v:.3g} @ layer {layers[int(s)]}" for v, s in zip(values, slots)]
    return [f"{v:.3g}" for v in values]


def render_feature(ctx: Ctx, sid: str, f: int) -> None:
    idx = cache.open_index(ctx.run, ctx.train)
    info = idx.info(sid)
    rec = idx.feature(sid, f)
    layers = info["cfg"].get("layers") or [int(k.rsplit(".", 1)[1]) for k in info["cfg"].get("in_keys", [])]
    multilayer = info["mode"] == "multilayer"
    tok = idx.token_str

    st.subheader(f"{sid} · feature {f}")
    if "explanation" in rec:
        score = float(rec.get("explanation_score", float("nan")))
        st.text(f"Explanation ({idx.meta.get('explainer', '?')}): {rec['explanation']}")
        st.caption("detection F1 on held-out contexts: " + ("n/a" if math.isnan(score) else f"{score:.2f}"))
    c = st.columns(5)
    c[0].metric("density", f"{float(rec['frequency']):.3%}")
    c[1].metric("firings", f"{int(rec['count']):,}")
    c[2].metric("mean act (when firing)", f"{float(rec['mean_act']):.3g}")
    c[3].metric("max act", f"{float(rec['max_act']):.3g}")
    if multilayer:
        c[4].metric("mean layer", "—" if np.isnan(rec["mean_layer"]) else f"{float(rec['mean_layer']):.2f}")
    else:
        c[4].metric("keys", ", ".join(info["cfg"].get("in_keys", [])))

    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Top activations**")
        ok = rec["top_row"] >= 0
        if ok.any():
            html(contexts_html(rec["top_tokens"][ok], rec["top_acts"][ok],
                               example_labels(rec["top_value"][ok], rec["top_slot"][ok], layers, multilayer),
                               tok, float(rec["max_act"])))
        else:
            st.write("This feature never fired on the analysed tokens.")
        ok = rec["sample_row"] >= 0
        if ok.any():
            st.markdown("**Samples from activation quantile intervals** (highest first)")
            intervals = rec["sample_interval"][ok]
            for q in np.unique(intervals):
                m = intervals == q
                vals = rec["sample_value"][ok][m]
                st.caption(f"interval {int(q) + 1}: activations {vals.min():.3g}–{vals.max():.3g}")
                html(contexts_html(rec["sample_tokens"][ok][m], rec["sample_acts"][ok][m],
                                   example_labels(vals, rec["sample_slot"][ok][m], layers, multilayer),
                                   tok, float(rec["max_act"])))
    with right:
        if float(rec["hist_hi"]) > 0:
            st.plotly_chart(charts.activation_histogram(np.asarray(rec["hist_counts"]), float(rec["hist_hi"])),
                            key=f"hist-{sid}-{f}")
        if "logit_top_ids" in rec:
            st.markdown("**Logit effects** (decoder direction through final norm and unembedding)")
            top = [tok(int(t)) for t in rec["logit_top_ids"]]
            bottom = [tok(int(t)) for t in rec["logit_bottom_ids"]]
            st.dataframe(pd.DataFrame({"promoted": [visible_token(s) for s in top], "logit": rec["logit_top_vals"],
                                       "suppressed": [visible_token(s) for s in bottom],
                                       "logit ": rec["logit_bottom_vals"]}), hide_index=True)
        render_neighbours(ctx, idx, sid, rec)
    render_depth(ctx, idx, sid, f, rec, info, layers)
    render_heads(idx, sid, f, rec, layers, multilayer)


def render_neighbours(ctx: Ctx, idx, sid: str, rec: dict) -> None:
    st.markdown("**Nearest features** (decoder cosine)")
    expl = cache.column(ctx.run, ctx.train, sid, "explanation")
    rows = [[feature_link(ctx.train, sid, int(j), f"#{int(j)}"), f"{float(cos):.3f}",
             str(expl[int(j)])[:80] if expl is not None else ""]
            for j, cos in zip(rec["neighbour_idx"], rec["neighbour_cos"])]
    html(grid(["feature", "cos", "explanation"], rows))


def render_depth(ctx: Ctx, idx, sid: str, f: int, rec: dict, info: dict, layers: list[int]) -> None:
    if "layer_mass" in rec:
        st.markdown("**Across depth** — one dictionary for every layer")
        c = st.columns([3, 1])
        c[0].plotly_chart(charts.layer_profile(layers, rec["layer_mass"]), key=f"profile-{sid}-{f}")
        c[1].metric("layers active", int(rec["n_layers_active"]))
        c[1].metric("entropy (nats)", f"{float(rec['layer_entropy']):.2f}")
    if "decoder_layer_norm" in rec:
        st.markdown("**Across depth** — crosscoder decoder norm per output layer")
        out_layers = [int(k.rsplit(".", 1)[1]) for k in info["cfg"].get("out_keys", [])]
        st.plotly_chart(charts.layer_profile(out_layers, rec["decoder_layer_norm"], "decoder norm per layer"),
                        key=f"decnorm-{sid}-{f}")
    lineage_panel(ctx, idx, sid, f, rec, layers)
