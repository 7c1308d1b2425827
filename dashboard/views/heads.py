"""Heads: for every attention-output SAE of the index, per layer, heads x features (each feature's mean share of
its pre-activation written by each head on its top contexts), how many features each head writes most, and each
head's strongest features."""
from __future__ import annotations

import streamlit as st

from dashboard import cache, heads_figures
from dashboard.render import feature_link, grid
from dashboard.views.common import Ctx, html, need_index


def render(ctx: Ctx) -> None:
    st.header("Heads")
    if not need_index(ctx):
        return
    idx = cache.open_index(ctx.run, ctx.train)
    attributed = [s for s in idx.sae_ids if idx.has(s, "head_share")]
    if not attributed:
        st.info("No SAE of this training run reads attention outputs. Harvest with `--sites attn_out`, train on "
                "`--sites attn_out` and run `strata analyze` to see which heads write each feature.")
        return
    st.caption("share: a head's part of a feature's pre-activation (its output through the SAE encoder), averaged "
               "over the feature's top contexts; red writes the feature, blue pushes it down")
    for sid in attributed:
        keys = idx.info(sid)["cfg"]["in_keys"]
        share = cache.column(ctx.run, ctx.train, sid, "head_share")
        counts = cache.column(ctx.run, ctx.train, sid, "head_contexts")
        freq = cache.column(ctx.run, ctx.train, sid, "frequency")
        for s, key in enumerate(keys):
            summary = heads_figures.layer_summary(share[:, s], counts[:, s], freq)
            st.subheader(f"{sid} · {key}: heads x features")
            if len(summary["features"]) == 0:
                st.write("No feature has top contexts at this layer.")
                continue
            c = st.columns([3, 2])
            c[0].plotly_chart(heads_figures.heads_features_figure(
                summary["share"], summary["features"], f"{key}: features by the head that writes most of them"),
                key=f"heads-features-{sid}-{s}")
            c[1].plotly_chart(heads_figures.main_head_figure(
                summary["main_counts"], f"{key}: features each head writes most"), key=f"heads-main-{sid}-{s}")
            rows = [[f"h{h}", int(summary["main_counts"][h]),
                     *[feature_link(ctx.train, sid, j, f"#{j} ({v:.0%})") for j, v in best]]
                    for h, best in summary["strongest"].items()]
            width = max(len(r) for r in rows)
            html(grid(["head", "features written most", *[f"strongest {i + 1}" for i in range(width - 2)]],
                      [r + [""] * (width - len(r)) for r in rows]))
