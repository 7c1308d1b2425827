"""Prompt explorer: type text, run the model (loaded lazily, once per server) and every SAE of the training run,
and see which features fire at each token and layer. Off in read-only mode."""
from __future__ import annotations

import streamlit as st
import torch
from markupsafe import Markup

from activations import layout
from activations.hooks import capture, key_depth
from activations.synth import SYNTHETIC_MODEL_ID
from dashboard import cache, data
from dashboard.render import TOKEN_CELL, feature_chip, grid, visible_token
from dashboard.views.common import Ctx, html, need_index
from sae.analysis.stream import slots_of

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog. In Python, a list is written with square brackets."


@torch.no_grad()
def prompt_features(lm, saes: dict, text: str, top: int = 3, max_tokens: int = cache.PROMPT_ROWS) -> dict:
    """{"tokens": [str], "columns": [{sae, label, idx [t, top], val [t, top]}]} ordered by depth."""
    tok = lm.tokenizer
    device = next(lm.model.parameters()).device
    ids = tok(text, return_tensors="pt").input_ids[:, :max_tokens].to(device)
    keys = sorted({k for s in saes.values() for k in s.cfg.in_keys}, key=key_depth)
    acts = capture(lm.model, keys, ids)
    columns = []
    for sid, sae in saes.items():
        sdev = sae.W_dec.device
        for slot in slots_of(sae):
            x = torch.cat([acts[k][0].float().to(sdev) for k in slot], dim=1)
            codes = (sae.encode(x, key=slot[0]) if len(slot) == 1 else sae.encode(x)).float()
            k = min(top, codes.shape[1])
            v, i = torch.topk(codes, k, dim=1)
            label = sid if len(slot) > 1 or sae.cfg.mode != "multilayer" else f"{sid} @ {slot[0]}"
            columns.append({"sae": sid, "label": label, "depth": key_depth(slot[-1]), "idx": i.cpu().numpy(),
                            "val": v.cpu().numpy()})
    columns.sort(key=lambda c: (c["depth"], c["label"]))
    tokens = tok.batch_decode([[int(t)] for t in ids[0]], clean_up_tokenization_spaces=False)
    return {"tokens": tokens, "columns": columns}


def grid_html(result: dict, train: str) -> Markup:
    """Tokens down, SAE layers across; a cell links the strongest features there, shaded by activation."""
    cols = result["columns"]
    vmax = max((float(c["val"].max()) for c in cols if c["val"].size), default=1.0) or 1.0
    rows = [[TOKEN_CELL % {"text": visible_token(s)}]
            + [Markup(" ").join(feature_chip(train, c["sae"], int(j), float(v), vmax)
                                for j, v in zip(c["idx"][t], c["val"][t]) if v > 0) for c in cols]
            for t, s in enumerate(result["tokens"])]
    return grid(["token", *(c["label"] for c in cols)], rows)


def render(ctx: Ctx) -> None:
    st.header("Prompt explorer")
    if ctx.read_only:
        st.info("The prompt explorer is switched off in read-only mode (it runs the model on typed text).")
        return
    if data.manifest(ctx.run)["model"]["id"] == SYNTHETIC_MODEL_ID:
        st.info("This run is synthetic (`strata synth`): there is no model to run typed text through.")
        return
    if not need_index(ctx):
        return
    text = st.text_area("text", DEFAULT_TEXT, key="prompt_text", max_chars=2000)
    top = st.slider("features shown per token and layer", 1, 5, 3, key="prompt_top")
    if not st.button("Run", key="prompt_run", type="primary") and "prompt_result" not in st.session_state:
        st.caption("Press Run: the model and SAEs load on first use.")
        return
    model_id = data.manifest(ctx.run)["model"]["id"]
    ckpt = data.inside(ctx.run, layout.checkpoint_dir(ctx.run, ctx.train))
    lm, precision = cache.load_lm(model_id, "auto")
    saes = cache.load_run_saes(str(ctx.run), ctx.train, ckpt.stat().st_mtime)
    key = (text, top, ctx.train)
    if st.session_state.get("prompt_key") != key:
        st.session_state.prompt_result = prompt_features(lm, saes, text, top)
        st.session_state.prompt_key = key
    result = st.session_state.prompt_result
    st.caption(f"{len(result['tokens'])} tokens × {len(result['columns'])} SAE layers; a cell lists the strongest "
               f"features there (click one to open its page); model {precision.line()}")
    html(grid_html(result, ctx.train))
    pick = st.selectbox("features at token", range(len(result["tokens"])), key="prompt_tok",
                        format_func=lambda t: f"{t}: {result['tokens'][t]!r}")
    rows = [{"layer": c["label"], "feature": int(j), "activation": float(v)}
            for c in result["columns"] for j, v in zip(c["idx"][pick], c["val"][pick]) if v > 0]
    if rows:
        st.dataframe(rows, hide_index=True)
    else:
        st.write("No feature fires at this token.")
