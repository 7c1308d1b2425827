"""Flow: how features pass through depth. A layered graph of matched features (one column per SAE, link width =
causal effect, colour = how many methods agree) that can be narrowed to an explanation text or a starting
feature, with a one-click link to every node's page; then features x layers for multi-layer SAEs and
crosscoders, and the residual stream's similarity between adjacent layers."""
from __future__ import annotations

import re

import numpy as np
import streamlit as st

from dashboard import cache, charts, flow_graph
from dashboard.render import feature_link, grid
from dashboard.views.common import Ctx, html, md_code, need_index

MAX_HEATMAP_ROWS = 400


def parse_start(text: str, idx) -> tuple[str, int] | None:
    """"resid.2:17" or "resid.2 #17" -> ("resid.2", 17); StrataError-free: None when it names no feature."""
    m = re.fullmatch(r"\s*(\S+?)\s*(?::|\s#|#|\s)\s*#?([0-9]{1,12})\s*", text)
    if not m or m.group(1) not in idx.sae_ids or int(m.group(2)) >= idx.n_latents(m.group(1)):
        return None
    return m.group(1), int(m.group(2))


def render_flow(ctx: Ctx, idx) -> None:
    links, causal = cache.flow_links(ctx.run, ctx.train)
    if not len(links):
        st.info("No matched features between SAEs in this index (a per-layer bank's adjacent SAEs are matched by "
                "`strata analyze`).")
        return
    st.subheader("Flow of features through depth")
    if not causal:
        st.caption("links are a per-layer bank's activation-correlation matches (width = correlation); re-run "
                   "`strata analyze` for causal matches")
    asked = ctx.query.get("start") or ""
    if st.session_state.get("flow_start_asked") != asked:  # a link (?start=sae:f) names the starting feature
        st.session_state.flow_start = st.session_state.flow_start_asked = asked
    c = st.columns([3, 3, 2])
    text = c[0].text_input("explanation contains", key="flow_text", help="plain text, not a pattern")
    start_text = c[1].text_input("start at feature", key="flow_start", placeholder="resid.2:17",
                                 help="SAE:feature; shows every feature linked to it, up and down")
    max_nodes = c[2].slider("most nodes", 10, 200, 60, 10, key="flow_nodes")
    if start_text != asked:  # the typed starting feature goes into the link
        st.session_state.flow_start_asked = start_text
        if start_text:
            ctx.query["start"] = start_text
        else:
            del ctx.query["start"]
    start = None
    if start_text.strip():
        start = parse_start(start_text, idx)
        if start is None:
            linked = sorted(set(links["up"]) | set(links["down"]))
            st.error(f"No feature {md_code(start_text)} to start from: write SAE:feature, e.g. {linked[0]}:0 "
                     f"(SAEs with links: {', '.join(linked)}).")
            return
    explanations = {s: cache.column(ctx.run, ctx.train, s, "explanation") for s in idx.sae_ids}
    densities = {s: cache.column(ctx.run, ctx.train, s, "frequency") for s in idx.sae_ids}
    fl = flow_graph.flow(idx, links, causal, explanations, densities, max_nodes, text, start)
    if not len(fl.nodes):
        what = f"feature {start[0]} #{start[1]}" if start else f"explanations containing {md_code(text)}"
        st.info(f"No links touch {what}.")
        return
    st.caption(f"{len(fl.nodes)} features, {len(fl.links)} links (of {len(links):,}); hover a node or link for "
               "details, open a feature from the table below")
    st.plotly_chart(charts.flow_figure(fl), key="flow")
    order = fl.nodes.sort_values(["column", "feature"], kind="stable")
    rows = [[s, feature_link(ctx.train, s, int(f), f"#{int(f)}"), str(e)[:100], f"{d:.2e}"]
            for s, f, e, d in zip(order["sae"], order["feature"], order["explanation"], order["density"])]
    html(grid(["SAE", "feature", "explanation", "density"], rows))


def render(ctx: Ctx) -> None:
    st.header("Flow")
    if not need_index(ctx):
        return
    idx = cache.open_index(ctx.run, ctx.train)
    if not flow_graph.can_show_depth(idx):
        only = ", ".join(idx.sae_ids) or "none"
        st.info(f"Depth views need two or more SAEs or a multi-layer SAE; training run {ctx.train} has one ({only}). "
                f"Train a per-layer bank (`strata train {ctx.run} --layers 0-3`) or a multi-layer SAE "
                f"(`--mode multilayer`) and analyse it.")
        return
    render_flow(ctx, idx)

    for sid in [s for s in idx.sae_ids if idx.has(s, "layer_mass")]:
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
        info = idx.info(sid)
        st.subheader(f"{sid}: crosscoder decoder norm per layer")
        norms = cache.column(ctx.run, ctx.train, sid, "decoder_layer_norm")
        share = norms / np.maximum(norms.sum(1, keepdims=True), 1e-12)
        out_layers = [int(k.rsplit(".", 1)[1]) for k in info["cfg"]["out_keys"]]
        centre = (share * np.array(out_layers)).sum(1)
        order = np.argsort(centre, kind="stable")[:MAX_HEATMAP_ROWS]
        st.plotly_chart(charts.feature_layer_heatmap(share[order], out_layers, order), key=f"xheat-{sid}")

    if idx.residual_similarity:
        st.subheader("Residual stream similarity between adjacent layers")
        st.plotly_chart(charts.residual_similarity(idx.residual_similarity), key="resid-sim")
