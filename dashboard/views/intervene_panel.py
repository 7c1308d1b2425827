"""Interventions and steering in the dashboard (the prompt explorer and the Circuits page): edit features of
the training run's SAEs on a prompt (sae/circuits/intervene.py), re-run the model, and show the change of the
top logits and of deeper features; steer a greedy continuation with a feature, beside the clean one."""
from __future__ import annotations

import streamlit as st
import torch

from activations import layout
from activations.errors import StrataError
from dashboard import cache, data
from dashboard.render import feature_link, grid, visible_token
from dashboard.views.common import Ctx, html
from sae.circuits.intervene import EDIT_HELP, intervene, parse_edits, steer


def _model_and_saes(ctx: Ctx, train: str):
    model_id = data.manifest(ctx.run)["model"]["id"]
    ckpt = data.inside(ctx.run, layout.checkpoint_dir(ctx.run, train))
    lm, _ = cache.load_lm(model_id, "auto")
    saes = cache.load_run_saes(str(ctx.run), train, ckpt.stat().st_mtime)
    return lm, saes


def _ids(lm, text: str, ids: list[int] | None) -> torch.Tensor:
    device = next(lm.model.parameters()).device
    if ids:
        return torch.tensor([ids], device=device)
    return lm.tokenizer(text, return_tensors="pt").input_ids[:, :cache.PROMPT_ROWS].to(device)


def show_result(result: dict, train: str) -> None:
    p = result["position"]
    st.caption(f"logits at position {p} ({visible_token(result['tokens'][p])!r}); largest change first")
    html(grid(["token", "clean", "edited", "change", "p clean", "p edited"],
              [[visible_token(r["token"]), f"{r['clean']:.3f}", f"{r['edited']:.3f}", f"{r['delta']:+.3f}",
                f"{r['p_clean']:.4f}", f"{r['p_edited']:.4f}"] for r in result["logits"]]))
    if result["features"]:
        st.caption("downstream features that change most at that position")
        html(grid(["SAE", "key", "feature", "clean", "edited", "change"],
                  [[r["sae"], r["key"], feature_link(train, r["sae"], r["feature"], f"#{r['feature']}"),
                    f"{r['clean']:.3f}", f"{r['edited']:.3f}", f"{r['delta']:+.3f}"] for r in result["features"]]))
    else:
        st.caption("no deeper feature changes at that position")


def render(ctx: Ctx, text: str, default_edit: str = "", key: str = "iv", ids: list[int] | None = None,
           train: str | None = None) -> None:
    """The panel: an edit line (EDIT_HELP), the position reported, Run; a steering line and Generate."""
    train = train or ctx.train
    if ctx.read_only or not train:
        return
    st.subheader("Intervene")
    c = st.columns([4, 1, 1])
    edit = c[0].text_input("features to edit", default_edit, key=f"{key}_edit", help=EDIT_HELP,
                           placeholder="resid.2:17@5*0")
    position = c[1].number_input("position", value=-1, step=1, key=f"{key}_pos", help="-1 = last token")
    top = c[2].number_input("logits", 1, 50, 10, key=f"{key}_top")
    if st.button("Run intervention", key=f"{key}_run"):
        try:
            lm, saes = _model_and_saes(ctx, train)
            st.session_state[f"{key}_result"] = intervene(lm.model, lm.tokenizer, saes, _ids(lm, text, ids),
                                                          parse_edits(edit), int(position), int(top))
        except StrataError as e:
            st.session_state.pop(f"{key}_result", None)
            st.error(str(e))
    if f"{key}_result" in st.session_state:
        show_result(st.session_state[f"{key}_result"], train)

    st.subheader("Steer")
    c = st.columns([4, 1])
    spec = c[0].text_input("features to steer with", key=f"{key}_steer", placeholder="resid.2:17*8",
                           help="SAE[/KEY]:FEATURE*ALPHA; alpha x the decoder direction is added at every position")
    new_tokens = c[1].number_input("new tokens", 1, 100, 20, key=f"{key}_new")
    if st.button("Generate", key=f"{key}_gen"):
        try:
            lm, saes = _model_and_saes(ctx, train)
            st.session_state[f"{key}_steered"] = steer(lm.model, lm.tokenizer, saes, _ids(lm, text, ids),
                                                       parse_edits(spec), int(new_tokens))
        except StrataError as e:
            st.session_state.pop(f"{key}_steered", None)
            st.error(str(e))
    if f"{key}_steered" in st.session_state:
        out = st.session_state[f"{key}_steered"]
        left, right = st.columns(2)
        left.markdown("**clean continuation**")
        left.code(out["clean"], language=None)
        right.markdown("**steered continuation**")
        right.code(out["steered"], language=None)
