"""The feature page's attention-heads panel (attention-output SAEs): which heads write this feature on its top
contexts (dashboard/heads_figures.py builds the figures and the table, the static bundle uses the same)."""
from __future__ import annotations

import streamlit as st

from dashboard import heads_figures
from dashboard.views.common import html


def render_heads(idx, sid: str, f: int, rec: dict, layers: list[int], multilayer: bool) -> None:
    shown = heads_figures.feature_heads(rec, layers, multilayer, idx.token_str)
    if shown is None:
        return
    st.markdown("**Attention heads** — each head's share of the pre-activation on the top contexts "
                "(direct attribution: the head's output through the SAE encoder; heads and bias sum to 1)")
    st.caption(shown["main"])
    c = st.columns(2)
    for i, fig in enumerate(shown["figures"]):
        c[i].plotly_chart(fig, key=f"heads-{i}-{sid}-{f}")
    html(shown["table"])
