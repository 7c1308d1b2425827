"""What every page gets, and small helpers shared by pages."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from markupsafe import Markup


@dataclass
class Ctx:
    run: Path
    read_only: bool
    train: str | None  # training run whose index is shown (None: no index yet)
    trains: list[str]
    query: object  # st.query_params


def need_index(ctx: Ctx) -> bool:
    if ctx.train is None:
        st.warning(f"This run has no feature index yet: run `strata analyze {ctx.run}` and reload.")
        return False
    return True


def pick_sae(ctx: Ctx, sae_ids: list[str], label: str = "SAE", key: str = "sae", format_func=str) -> str:
    """SAE selector initialised from the URL (?sae=), kept in the URL."""
    opening = key not in st.session_state or st.session_state[key] not in sae_ids
    if opening:
        q = ctx.query.get("sae")
        st.session_state[key] = q if q in sae_ids else sae_ids[0]
    sid = st.selectbox(label, sae_ids, key=key, format_func=format_func)
    if key == "sae" and ctx.query.get("sae") != sid:
        if not opening and "f" in ctx.query:  # a feature number in the URL belongs to the SAE it was chosen in
            del ctx.query["f"]
        ctx.query["sae"] = sid
    return sid


def md_code(text: str) -> str:
    """`text` (e.g. from the URL) as a markdown code span for Streamlit's st.error, st.caption ...: shown exactly
    as written, never read as a link, an image or emphasis (the fence is longer than any backtick run inside)."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def html(fragment: Markup) -> None:
    """Render HTML built by dashboard.render: only Markup, whose corpus text was escaped as it was built."""
    if not isinstance(fragment, Markup):
        raise TypeError("html() shows only markupsafe.Markup built by dashboard.render, never a plain string")
    st.markdown(str(fragment), unsafe_allow_html=True)
