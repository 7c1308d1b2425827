"""The lineage panel of a feature page: where a multi-layer SAE's feature is born, peaks and fades, and the
features it is matched to upstream and downstream (scores, agreeing methods, explanations), each a link."""
from __future__ import annotations

import math
from urllib.parse import urlencode

import streamlit as st

from dashboard import cache, flow_graph
from dashboard.render import LINK, feature_link, grid
from dashboard.views.common import Ctx, html

HEAD = ["SAE", "feature", "causal effect", "act. corr", "decoder cos", "methods agreeing", "kind", "explanation"]


def number(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.3f}"


def lineage_rows(ctx: Ctx, entries: list[dict]) -> list[list]:
    rows = []
    for e in entries:
        expl = cache.column(ctx.run, ctx.train, e["sae"], "explanation")
        rows.append([e["sae"], feature_link(ctx.train, e["sae"], e["feature"], f"#{e['feature']}"), number(e["effect"]),
                     number(e["corr"]), number(e["cos"]), ", ".join(flow_graph.methods_of(e["agree"])) or "—",
                     e["kind"], str(expl[e["feature"]])[:80] if expl is not None else ""])
    return rows


def lineage_panel(ctx: Ctx, idx, sid: str, f: int, rec: dict, layers: list[int]) -> None:
    cycle = flow_graph.life_cycle(layers, rec["layer_mass"]) if "layer_mass" in rec else None
    lin, causal = flow_graph.lineage(idx, sid, f)
    if cycle is None and not (lin["upstream"] or lin["downstream"]):
        if sid in flow_graph.matched_saes(idx):
            st.markdown("**Lineage**")
            st.caption("no matched feature upstream or downstream of this one")
        return
    st.markdown("**Lineage**")
    if cycle is not None:
        c = st.columns(3)
        c[0].metric("born at layer", cycle["born"], help="first layer with at least 10% of its peak mass")
        c[1].metric("peaks at layer", cycle["peak"])
        c[2].metric("fades after layer", cycle["fades"], help="last layer with at least 10% of its peak mass")
    if not causal and (lin["upstream"] or lin["downstream"]):
        st.caption("activation-correlation matches of a per-layer bank; re-run `strata analyze` for causal matches")
    for direction, entries in (("upstream", lin["upstream"]), ("downstream", lin["downstream"])):
        if entries:
            st.caption(f"{direction} ({'strongest effect' if causal else 'strongest correlation'} first)")
            html(grid(HEAD, lineage_rows(ctx, entries)))
    if lin["upstream"] or lin["downstream"]:
        href = "?" + urlencode({"page": "flow", "train": ctx.train, "start": f"{sid}:{f}"})
        html(LINK % {"href": href, "text": "show this feature's links in the Flow view"})
