"""Prompt explorer: type text, run the model (loaded lazily, once per server) and every SAE of the training run,
and read it across depth: for each layer, the logit lens (what the model would predict next from that layer's
residual) and the features that fire at each token, with their explanations. Positions the SAEs never trained on
are greyed out. Pick tokens and a feature to follow it through every layer. Off in read-only mode."""
from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st
import torch
from markupsafe import Markup

from activations import layout
from activations.errors import StrataError
from activations.hooks import capture, key_depth, n_layers, split_key, unembedding
from activations.synth import is_synthetic
from activations.tokens import decode_each
from dashboard import cache, data
from dashboard.render import feature_href, grid, visible_token
from dashboard.views import intervene_panel
from dashboard.views.common import Ctx, html, need_index
from sae.analysis.analyze import trained_exclude_first
from sae.analysis.feature_chain import matched_chain
from sae.analysis.logit_lens import logit_lens
from sae.analysis.stream import slots_of

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog. In Python, a list is written with square brackets."
LENS_K = 5  # next-token predictions kept per layer and position (the top one is shown, all of them on hover)

UNTRAINED = "background: #e5e7eb; color: #6b7280"
TOKEN_HEAD = Markup('<span class="%(cls)s" data-pos="%(pos)s" title="%(title)s"%(style)s>%(text)s</span>')
LENS_CELL = Markup('<span class="strata-lens" data-ids="%(ids)s" title="%(title)s" '
                   'style="background: rgba(59, 130, 246, %(alpha)s)">%(text)s</span>')
CHIP = Markup('<a class="strata-chip" href="%(href)s" target="_self" title="%(title)s" '
              'style="background: rgba(249, 115, 22, %(alpha)s)">%(text)s</a>')
GREY_CELL = Markup('<span class="strata-untrained" title="%(title)s" style="' + UNTRAINED + '">\u00b7</span>')
ROW_LABEL = Markup('<span class="%(cls)s">%(text)s</span>')
SCROLL = Markup('<div class="strata-prompt" style="overflow-x: auto">%s</div>')


@torch.no_grad()
def prompt_features(lm, saes: dict, text: str, max_tokens: int, top: int = 3, lens_k: int = LENS_K) -> dict:
    """Run the model and every SAE on `text`, cut to `max_tokens` tokens.

    {"tokens": [str], "n_tokens": tokens before the cut,
     "columns": [{sae, label, key, depth, codes [t, n], idx [t, top], val [t, top]}] one per SAE input slot,
     "lens": [{key, label, depth, ids [t, lens_k], probs [t, lens_k]}] one per residual layer the SAEs read,
             and the last residual (the model's own prediction); [] for a model without an unembedding,
     "lens_note": why there is no lens, or ""} ordered by depth."""
    tok = lm.tokenizer
    device = next(lm.model.parameters()).device
    all_ids = tok(text, return_tensors="pt").input_ids
    ids = all_ids[:, :max_tokens].to(device)
    keys = {k for s in saes.values() for k in s.cfg.in_keys}
    try:
        norm, W_U = unembedding(lm.model)
        last = f"resid.{n_layers(lm.model)}"
        lens_keys, note = sorted({k for k in keys if split_key(k)[0] == "resid"} | {last}, key=key_depth), ""
    except StrataError as e:
        norm, W_U, last, lens_keys, note = None, None, "", [], str(e)
    acts = capture(lm.model, sorted(keys | set(lens_keys), key=key_depth), ids)
    columns = []
    for sid, sae in saes.items():
        sdev = sae.W_dec.device
        for slot in slots_of(sae):
            x = torch.cat([acts[k][0].float().to(sdev) for k in slot], dim=1)
            codes = (sae.encode(x, key=slot[0]) if len(slot) == 1 else sae.encode(x)).float()
            v, i = torch.topk(codes, min(top, codes.shape[1]), dim=1)
            label = sid if len(slot) > 1 or sae.cfg.mode != "multilayer" else f"{sid} @ {slot[0]}"
            columns.append({"sae": sid, "label": label, "key": slot[-1], "depth": key_depth(slot[-1]),
                            "codes": codes.cpu().numpy(), "idx": i.cpu().numpy(), "val": v.cpu().numpy()})
    columns.sort(key=lambda c: (c["depth"], c["label"]))
    lens = []
    for key in lens_keys:
        top_ids, probs = logit_lens(acts[key][0], norm, W_U, lens_k)
        lens.append({"key": key, "label": f"lens {key}" + (" (model output)" if key == last else ""),
                     "depth": key_depth(key), "ids": top_ids.numpy(), "probs": probs.numpy()})
    tokens = decode_each(tok, ids[0])
    return {"tokens": tokens, "n_tokens": int(all_ids.shape[1]), "columns": columns, "lens": lens, "lens_note": note}


def untrained_title(pos: int, first: int) -> str:
    return (f"position {pos}: the SAEs never trained here (training left out the first {first} token(s) of every "
            "context: the attention sink, whose activations are far larger than anywhere else), so no features "
            "are shown")


def explanation_of(expl, f: int) -> str:
    return str(expl[f]) if expl is not None else "no explanation in the index"


def grid_html(result: dict, train: str, explanations: dict, first: int, token_str) -> Markup:
    """Layers down (shallow first), tokens across: for each layer its logit-lens row (top prediction, the top
    few with probabilities on hover) beside the rows of the SAEs reading it (strongest features, explanation on
    hover, linked to their pages). Positions before `first` are greyed in the SAE rows."""
    tokens = result["tokens"]
    head = [ROW_LABEL % {"cls": "strata-row-label", "text": "layer"}]
    for t, s in enumerate(tokens):
        grey = t < first
        head.append(TOKEN_HEAD % {"cls": "tok strata-untrained" if grey else "tok", "pos": t,
                                  "title": untrained_title(t, first) if grey else f"position {t}",
                                  "style": Markup(f' style="{UNTRAINED}"') if grey else Markup(""),
                                  "text": visible_token(s)})
    entries = [(r["depth"], 0, r["label"], "lens", r) for r in result["lens"]]
    entries += [(c["depth"], 1, c["label"], "sae", c) for c in result["columns"]]
    vmax = max((float(c["val"].max()) for c in result["columns"] if c["val"].size), default=1.0) or 1.0
    rows = []
    for _, _, label, kind, r in sorted(entries, key=lambda e: e[:3]):
        cells = [ROW_LABEL % {"cls": f"strata-row-label strata-{kind}-row", "text": label}]
        if kind == "lens":
            for t in range(len(tokens)):
                preds = [(visible_token(token_str(int(i))), float(p)) for i, p in zip(r["ids"][t], r["probs"][t])]
                title = f"{r['key']} at position {t} predicts: " + ", ".join(f"{s!r} {p:.0%}" for s, p in preds)
                cells.append(LENS_CELL % {"ids": ",".join(str(int(i)) for i in r["ids"][t]), "title": title,
                                          "alpha": f"{min(1.0, preds[0][1]):.2f}", "text": preds[0][0]})
        else:
            expl = explanations.get(r["sae"])
            for t in range(len(tokens)):
                if t < first:
                    cells.append(GREY_CELL % {"title": untrained_title(t, first)})
                    continue
                cells.append(Markup(" ").join(
                    CHIP % {"href": feature_href(train, r["sae"], int(j)), "alpha": f"{min(1.0, float(v) / vmax):.2f}",
                            "title": f"{r['sae']} #{int(j)} (activation {float(v):.3g}): {explanation_of(expl, int(j))}",
                            "text": str(int(j))}
                    for j, v in zip(r["idx"][t], r["val"][t]) if v > 0))
        rows.append(cells)
    return SCROLL % grid(head, rows)


def across_depth(result: dict, idx, column: int, f: int) -> list[dict]:
    """Feature f of result["columns"][column] at every layer of the prompt, shallowest first:
    [{"column", "feature", "corr", "values" [t]}]. A multi-layer SAE: the same feature in each of its layers;
    an SAE of a per-layer bank: the feature and its matches up and down the bank (sae.analysis.feature_chain);
    any other SAE: its one input."""
    cols = result["columns"]
    sid = cols[column]["sae"]
    if len([c for c in cols if c["sae"] == sid]) > 1:  # a multi-layer SAE: one column per layer
        chain = [{"sae": sid, "feature": f, "corr": None, "column": i} for i, c in enumerate(cols) if c["sae"] == sid]
    else:
        where = {c["sae"]: i for i, c in enumerate(cols)}
        chain = [{**link, "column": where[link["sae"]]} for link in matched_chain(idx, sid, f) if link["sae"] in where]
    return [{"column": link["column"], "feature": int(link["feature"]), "corr": link["corr"],
             "values": cols[link["column"]]["codes"][:, int(link["feature"])]} for link in chain]


def depth_figure(result: dict, rows: list[dict], positions: list[int]) -> go.Figure:
    """Activation against layer, one line per picked token."""
    labels = [f"{result['columns'][r['column']]['label']} #{r['feature']}" for r in rows]
    fig = go.Figure([go.Scatter(x=labels, y=[float(r["values"][t]) for r in rows], mode="lines+markers",
                                name=f"{t}: {visible_token(result['tokens'][t])}") for t in positions])
    fig.update_layout(title="activation across depth", height=320, margin={"l": 40, "r": 10, "t": 40, "b": 40},
                      xaxis_title="layer · feature", yaxis_title="activation")
    return fig


def token_label(result: dict, t: int) -> str:
    return f"{t}: {visible_token(result['tokens'][t])!r}"


def render(ctx: Ctx) -> None:
    st.header("Prompt explorer")
    if ctx.read_only:
        st.info("The prompt explorer is switched off in read-only mode (it runs the model on typed text).")
        return
    if is_synthetic(data.manifest(ctx.run)["model"]):
        st.info("This run is synthetic (`strata synth`): there is no model to run typed text through.")
        return
    if not need_index(ctx):
        return
    text = st.text_area("text", DEFAULT_TEXT, key="prompt_text", max_chars=2000)
    top = st.slider("features shown per token and layer", 1, 5, 3, key="prompt_top")
    if not st.button("Run", key="prompt_run", type="primary") and "prompt_result" not in st.session_state:
        st.caption("Press Run: the model and SAEs load on first use.")
        return
    manifest = data.manifest(ctx.run)
    context = int(manifest["context_length"])
    first = trained_exclude_first(ctx.run, ctx.train)
    ckpt = data.inside(ctx.run, layout.checkpoint_dir(ctx.run, ctx.train))
    lm, precision = cache.load_lm(manifest["model"]["id"], "auto")
    saes = cache.load_run_saes(str(ctx.run), ctx.train, ckpt.stat().st_mtime)
    key = (text, top, ctx.train)
    if st.session_state.get("prompt_key") != key:
        st.session_state.prompt_result = prompt_features(lm, saes, text, context, top)
        st.session_state.prompt_key = key
        for k in ("prompt_tok", "prompt_tokens", "prompt_feature"):  # their choices belong to the previous text
            st.session_state.pop(k, None)
    result = st.session_state.prompt_result
    n = len(result["tokens"])
    if result["n_tokens"] > n:
        st.warning(f"The text is {result['n_tokens']} tokens, longer than the {context}-token contexts the SAEs were "
                   f"trained on: only its first {n} tokens are run and shown.")
    idx = cache.open_index(ctx.run, ctx.train)
    explanations = {sid: cache.column(ctx.run, ctx.train, sid, "explanation") for sid in idx.sae_ids}
    st.caption(f"{n} tokens; layers down, tokens across. Blue rows: the logit lens (the top next-token prediction "
               f"from that layer's residual through the final norm and unembedding; hover for the top {LENS_K}). "
               f"Other rows: the strongest features of each SAE (hover for the explanation, click to open). "
               f"Model {precision.line()}")
    if first:
        st.caption(f"Grey positions 0-{first - 1} were left out of training (`exclude_first = {first}` in "
                   f"train/{ctx.train}/config.json): the first token is an attention sink with activations far "
                   "larger than elsewhere, so features there mean nothing and are not shown.")
    if result["lens_note"]:
        st.caption(f"No logit lens: {result['lens_note']}")
    html(grid_html(result, ctx.train, explanations, first, idx.token_str))
    render_token_detail(result, explanations, first)
    render_across_depth(result, idx, explanations, first)
    intervene_panel.render(ctx, text)


def render_token_detail(result: dict, explanations: dict, first: int) -> None:
    pick = st.selectbox("features at token", range(len(result["tokens"])), key="prompt_tok",
                        index=min(first, len(result["tokens"]) - 1), format_func=lambda t: token_label(result, t))
    if pick < first:
        st.info(untrained_title(pick, first).capitalize() + ".")
        return
    rows = [{"layer": c["label"], "feature": int(j), "activation": float(v),
             "explanation": explanation_of(explanations.get(c["sae"]), int(j))}
            for c in result["columns"] for j, v in zip(c["idx"][pick], c["val"][pick]) if v > 0]
    if rows:
        st.dataframe(rows, hide_index=True, key="prompt_detail")
    else:
        st.write("No feature fires at this token.")


def render_across_depth(result: dict, idx, explanations: dict, first: int) -> None:
    st.subheader("One feature across depth")
    trained = list(range(first, len(result["tokens"])))
    if not trained:
        st.info("Every token of this text is at a position the SAEs never trained on; type a longer text.")
        return
    positions = st.multiselect("tokens", trained, default=trained[-1:], key="prompt_tokens",
                               format_func=lambda t: token_label(result, t))
    if not positions:
        st.caption("Pick one or more tokens to follow a feature that fires there through every layer.")
        return
    cols = result["columns"]
    strength: dict[tuple[int, int], float] = {}
    for ci, c in enumerate(cols):
        for t in positions:
            for j, v in zip(c["idx"][t], c["val"][t]):
                if v > 0:
                    strength[(ci, int(j))] = max(strength.get((ci, int(j)), 0.0), float(v))
    if not strength:
        st.write("No feature fires at these tokens.")
        return
    options = sorted(strength, key=lambda o: -strength[o])

    def option_label(o):
        ci, j = o
        return f"{cols[ci]['label']} #{j} — {explanation_of(explanations.get(cols[ci]['sae']), j)[:80]}"

    ci, f = st.selectbox("feature (those firing at the picked tokens, strongest first)", options,
                         key="prompt_feature", format_func=option_label)
    rows = across_depth(result, idx, ci, f)
    table = []
    for r in rows:
        c = cols[r["column"]]
        row = {"layer": c["label"], "feature": r["feature"],
               "link corr": None if r["corr"] is None else round(r["corr"], 3),
               "explanation": explanation_of(explanations.get(c["sae"]), r["feature"])}
        row.update({token_label(result, t): float(r["values"][t]) for t in positions})
        table.append(row)
    how = ("the same feature in every layer of the multi-layer SAE" if len({cols[r["column"]]["sae"] for r in rows}) == 1
           and len(rows) > 1 else "the feature and its matches up and down the bank (link corr: activation "
           "correlation of the match towards the picked feature)" if len(rows) > 1 else "this SAE's one input")
    st.caption(f"{option_label((ci, f))}: {how}")
    st.dataframe(table, hide_index=True, key="prompt_depth")
    st.plotly_chart(depth_figure(result, rows, positions), key="prompt_depth_chart")
