"""Depth: features x layers for multi-layer SAEs, paths of matched features through per-layer banks, and the
residual stream's similarity between adjacent layers."""
from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard import cache, charts
from dashboard.render import feature_link, grid
from dashboard.views.common import Ctx, html, need_index

MAX_HEATMAP_ROWS = 400


def render(ctx: Ctx) -> None:
    st.header("Depth")
    if not need_index(ctx):
        return
    idx = cache.open_index(ctx.run, ctx.train)
    shown = False

    multi = [s for s in idx.sae_ids if idx.has(s, "layer_mass")]
    for sid in multi:
        shown = True
        info = idx.info(sid)
        layers = info["cfg"].get("layers") or [int(k.rsplit(".", 1)[1]) for k in info["cfg"]["in_keys"]]
        st.subheader(f"{sid}: one dictionary for layers {layers[0]}–{layers[-1]}")
        mass = cache.column(ctx.run, ctx.train, sid, "layer_mass")
        mean_layer = cache.column(ctx.run, ctx.train, sid, "mean_layer")
        freq = cache.column(ctx.run, ctx.train, sid, "frequency")
        alive = np.nonzero(freq > 0)[0]
        # the most active features, then ordered by mean layer (the MLSAE paper's view)
        top = alive[np.argsort(-freq[alive], kind="stable")[:MAX_HEATMAP_ROWS]]
        order = top[np.argsort(mean_layer[top], kind="stable")]
        st.plotly_chart(charts.feature_layer_heatmap(mass[order], layers, order), key=f"heat-{sid}")
        c = st.columns(3)
        n_active = cache.column(ctx.run, ctx.train, sid, "n_layers_active")
        c[0].metric("alive features", f"{len(alive):,}")
        c[1].metric("median layers active", f"{np.median(n_active[alive]) if len(alive) else 0:.0f}")
        c[2].metric("median entropy (nats)",
                    f"{np.median(cache.column(ctx.run, ctx.train, sid, 'layer_entropy')[alive]) if len(alive) else 0:.2f}")

    for sid in [s for s in idx.sae_ids if idx.has(s, "decoder_layer_norm")]:
        shown = True
        info = idx.info(sid)
        st.subheader(f"{sid}: crosscoder decoder norm per layer")
        norms = cache.column(ctx.run, ctx.train, sid, "decoder_layer_norm")
        share = norms / np.maximum(norms.sum(1, keepdims=True), 1e-12)
        out_layers = [int(k.rsplit(".", 1)[1]) for k in info["cfg"]["out_keys"]]
        centre = (share * np.array(out_layers)).sum(1)
        order = np.argsort(centre, kind="stable")[:MAX_HEATMAP_ROWS]
        st.plotly_chart(charts.feature_layer_heatmap(share[order], out_layers, order), key=f"xheat-{sid}")

    for p_i, p in enumerate(idx.paths):
        shown = True
        saes = p["saes"]
        st.subheader("Paths through " + " → ".join(saes))
        st.caption("each feature's best match in the next layer's SAE (decoder-cosine candidates ranked by activation "
                   "correlation), chained while the correlation stays above the analysis threshold")
        if len(p["features"]) == 0:
            st.write("No links above the threshold.")
            continue
        st.plotly_chart(charts.paths_figure(p["features"], p["score"], saes), key=f"paths-{p_i}")
        rows = [[feature_link(ctx.train, s, int(j), f"#{int(j)}") if j >= 0 else "" for s, j in zip(saes, feats)]
                + [f"{float(score):.2f}"] for feats, score in zip(p["features"][:30], p["score"][:30])]
        html(grid([*saes, "mean corr"], rows))

    if idx.residual_similarity:
        shown = True
        st.subheader("Residual stream similarity between adjacent layers")
        st.plotly_chart(charts.residual_similarity(idx.residual_similarity), key="resid-sim")
    if not shown:
        st.info("This training run has a single-layer SAE and the run has one residual layer: nothing spans depth. "
                "Train a multi-layer SAE or a per-layer bank to see features across layers.")
