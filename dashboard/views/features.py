"""Features: filter and sort an SAE's features, then open one (its page is views/feature.py)."""
from __future__ import annotations

import re

import numpy as np
import streamlit as st

from activations.errors import StrataError
from activations.hooks import key_depth
from dashboard import cache
from dashboard.views.common import Ctx, md_code, need_index, pick_sae
from dashboard.views.feature import render_feature
from sae.analysis.ranking import FLAG_HELP, feature_flags, formatting_features, interpretable_order

# the first sort is the default: the order of sae/analysis/ranking.py (column "rank", added by `ranked`)
SORTS = {"interpretable first": ("rank", True), "max activation": ("max_act", False),
         "density (high first)": ("frequency", False), "density (low first)": ("frequency", True),
         "mean activation": ("mean_act", False), "explanation score": ("score", False),
         "mean layer": ("mean_layer", True), "feature index": ("feature", True)}


@st.cache_data(max_entries=16, show_spinner=False)
def _ranking(run, train: str, sid: str, version: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(each feature's place in the default order, its flag: "always-on", "outlier-only" or ""); `version` (the
    index file's path and mtime) is part of the cache key, so a re-analysed run is ranked again."""
    idx = cache.open_index(run, train)
    col = idx.column
    order = interpretable_order(col(sid, "explanation_score"), col(sid, "frequency"), col(sid, "explanation"),
                                formatting_features(col(sid, "top_tokens"), col(sid, "top_value"), idx.vocab))
    place = np.empty(len(order), dtype=np.int64)
    place[order] = np.arange(len(order))
    return place, feature_flags(col(sid, "frequency"), col(sid, "mean_act"), col(sid, "max_act"))


def ranked(ctx: Ctx, sid: str, df):
    """The feature table with its default order ("rank") and flags ("flag")."""
    place, flags = _ranking(ctx.run, ctx.train, sid, cache.index_version(ctx.run, ctx.train))
    return df.assign(rank=place, flag=flags)


def filtered(ctx: Ctx, sid: str, df):
    c = st.columns(4)
    text = c[0].text_input("explanation contains", key="q_text")
    token = c[1].text_input("fires on token", key="q_token", help="features whose top examples peak on this token")
    lo, hi = c[2].slider("log10 density", -8.0, 0.0, (-8.0, 0.0), 0.25, key="q_density")
    sorts = [s for s, (col, _) in SORTS.items() if col in df.columns]
    sort = c[3].selectbox("sort by", sorts, key="q_sort")
    flagged = {flag: int((df["flag"] == flag).sum()) for flag in FLAG_HELP}
    show_flagged = st.toggle(f"show always-on and outlier-only features ({sum(flagged.values())})", key="q_flagged",
                             help="; ".join(f"{flag}: {why}" for flag, why in FLAG_HELP.items()))
    if sort == "interpretable first":
        st.caption("Interpretable first: explanation score (detection F1 on held-out contexts), best first; features "
                   "that peak mostly on whitespace or punctuation, and repeats of an explanation listed above, come "
                   "after the rest.")
    if not show_flagged and any(flagged.values()):
        st.caption("Set aside (the toggle shows them, marked in the flag column): " + "; ".join(
            f"{n} {flag} ({FLAG_HELP[flag]})" for flag, n in flagged.items() if n) + ".")
    keep = np.ones(len(df), dtype=bool) if show_flagged else np.array(df["flag"] == "")
    logf = np.log10(np.maximum(df["frequency"].to_numpy(), 1e-12))
    if lo > -8.0:
        keep &= logf >= lo
    if hi < 0.0:
        keep &= logf <= hi
    if text and "explanation" in df.columns:
        keep &= df["explanation"].str.contains(text, case=False, regex=False).to_numpy()
    if token.strip():
        keep &= np.isin(df["feature"].to_numpy(), cache.features_firing_on(ctx.run, ctx.train, sid, token))
    if "mean_layer" in df.columns:
        ml = df["mean_layer"].to_numpy()
        finite = ml[np.isfinite(ml)]
        if len(finite) and finite.max() > finite.min():
            a, b = st.slider("mean layer", float(np.floor(finite.min())), float(np.ceil(finite.max())),
                             (float(np.floor(finite.min())), float(np.ceil(finite.max()))), key="q_layer")
            keep &= (ml >= a) & (ml <= b)
    col, ascending = SORTS[sort]
    return df[keep].sort_values(col, ascending=ascending, kind="stable", na_position="last")


def sae_depth(idx, sid: str) -> tuple[float, int]:
    """Where an SAE reads in the forward pass (its shallowest key; one-layer SAEs before those reading several
    from there), so the picker lists layers in depth order rather than alphabetically (resid.12 before resid.6)."""
    keys = idx.info(sid)["cfg"].get("in_keys") or []
    try:
        return (min(key_depth(k) for k in keys) if keys else float("inf")), len(keys)
    except StrataError:  # a key Strata does not know: after the others
        return float("inf"), len(keys)


def linked_feature(q: str, n: int) -> int | None:
    """The feature index from a link's ?f=, or None unless it is a whole number in 0..n-1."""
    return int(q) if re.fullmatch(r"[0-9]{1,12}", q) and int(q) < n else None


def render(ctx: Ctx) -> None:
    st.header("Features")
    if not need_index(ctx):
        return
    idx = cache.open_index(ctx.run, ctx.train)
    if not idx.sae_ids:
        st.warning("The index holds no SAEs.")
        return
    # the SAE picker is also the layer filter of a per-layer bank: each label names the layer(s) it reads
    labels = {s: f"{s} — {', '.join(idx.info(s)['cfg'].get('in_keys', []))}" for s in idx.sae_ids}
    sid = pick_sae(ctx, sorted(idx.sae_ids, key=lambda s: sae_depth(idx, s)), label="SAE (layer)",
                   format_func=labels.get)
    st.caption(f"{idx.n_latents(sid):,} features, {idx.info(sid)['mode']}")
    df = ranked(ctx, sid, cache.feature_table(ctx.run, ctx.train, sid))
    view = filtered(ctx, sid, df)
    st.caption(f"{len(view):,} of {len(df):,} features match")
    shown = view.head(1000)
    event = st.dataframe(shown, hide_index=True, on_select="rerun", selection_mode="single-row", key=f"table-{sid}",
                         height=280, column_config={"frequency": st.column_config.NumberColumn(format="%.2e")})

    n = idx.n_latents(sid)
    fkey = f"f-{sid}"
    picked = getattr(getattr(event, "selection", None), "rows", None) if event is not None else None
    if picked and st.session_state.get(f"sel-{sid}") != picked:  # a new row click opens that feature
        st.session_state[f"sel-{sid}"] = picked
        st.session_state[fkey] = int(shown.iloc[picked[0]]["feature"])
    q = ctx.query.get("f")
    if fkey not in st.session_state:  # the page opens on the linked feature, or on the first one listed
        first = int(view.iloc[0]["feature"]) if len(view) else 0
        st.session_state[fkey] = first if q is None else linked_feature(q, n)
    f = st.number_input("feature", 0, n - 1, key=fkey, placeholder=f"0-{n - 1}")
    if f is None and q is not None and linked_feature(q, n) is None:  # say so rather than show another feature
        st.error(f"This link asks for feature {md_code('f=' + q)}, which {sid} does not have: its features are "
                 f"0-{n - 1}. Type one above or pick a row in the table.")
        return
    if f is None:  # the number field was emptied
        st.info(f"Type a feature number in 0-{n - 1} above, or pick a row in the table.")
        return
    if q != str(f):
        ctx.query["f"] = str(f)
    st.divider()
    render_feature(ctx, sid, int(f))
