"""`strata share RUN --features SPEC`: a static HTML bundle of chosen feature pages that opens with no Python
and no network: RUN/share/index.html, one page per feature (<sae>/<feature>.html) with its lineage, flow.html
(the flow graph of matched features, when the index has any), and plotly.js copied from the installed plotly
package into assets/ (no CDN). Written to a temporary folder and swapped in whole; the
output folder may only be missing, empty, or an earlier bundle (activations/ownership.py).

The pages are Jinja2 templates (dashboard/templates/) rendered with autoescape on: every value is escaped
unless it is Markup, and the only Markup passed in is what dashboard/render.py built (token contexts, escaped
exactly as in the app) and plotly's own figure HTML.

SPEC: "all"; "top:N" (the N densest features of each SAE); "3,7,10-20" (those indices in every SAE);
"resid.3:1,2;resid.6:5" (per SAE).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from activations import layout
from activations.atomic import staged_dir
from activations.errors import StrataError
from activations.lock import run_lock
from activations.ownership import check_swap_target
from dashboard import charts, data, flow_graph, heads_figures
from dashboard.render import CSS, contexts_html, visible_token
from sae.analysis.index_file import FeatureIndex

KIND = "share"
SPEC_HELP = "use all, top:N, 1,2,5-9 or sae:1,2;sae2:3"
FLOW_NODES = 60  # the flow page's graph: as many nodes as the app's Flow page opens with
TEMPLATES = Environment(loader=PackageLoader("dashboard", "templates"), autoescape=True, undefined=StrictUndefined,
                        trim_blocks=True, lstrip_blocks=True)


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", s)


def _indices(spec: str, sid: str, n: int) -> list[int]:
    """Feature indices of "1,2,5-9" for SAE `sid` of `n` features; every index must exist."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise StrataError(f"bad feature list {part!r}; {SPEC_HELP}")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise StrataError(f"feature range {part!r} runs backwards; write it low-high, e.g. {b}-{a}")
        if b >= n:
            raise StrataError(f"feature {b} (in {part!r}) does not exist in {sid}, which has features 0-{n - 1}")
        out.update(range(a, b + 1))
    if not out:
        raise StrataError(f"no features listed for {sid} in {spec!r}; {SPEC_HELP}")
    return sorted(out)


def select_features(idx: FeatureIndex, spec: str) -> dict[str, list[int]]:
    spec = spec.strip()
    if not spec:
        raise StrataError(f"--features is empty; {SPEC_HELP}")
    if spec == "all":
        return {s: list(range(idx.n_latents(s))) for s in idx.sae_ids}
    if spec.startswith("top:"):
        k = int(spec[4:]) if re.fullmatch(r"[0-9]+", spec[4:]) else 0
        if k <= 0:
            raise StrataError(f"bad feature spec {spec!r}; write top:N with N > 0")
        return {s: sorted(np.argsort(-idx.column(s, "frequency"), kind="stable")[:k].tolist()) for s in idx.sae_ids}
    if ":" in spec:
        out: dict[str, list[int]] = {}
        for part in spec.split(";"):
            if not part.strip():
                continue
            sid, _, lst = (x.strip() for x in part.partition(":"))
            chosen = _indices(lst, sid, idx.n_latents(sid))  # n_latents raises for an unknown SAE
            out[sid] = sorted(set(out.get(sid, [])) | set(chosen))
        return out
    return {s: _indices(spec, s, idx.n_latents(s)) for s in idx.sae_ids}


def fig_html(fig, post_script: str | None = None) -> Markup:
    """plotly's HTML for a figure (it serialises the data as escaped JSON)."""
    return Markup(fig.to_html(include_plotlyjs=False, full_html=False, config={"displaylogo": False},
                              post_script=post_script))


# a click on a flow node opens its page: the node's customdata is [href, hover text] (href "" when not shared)
OPEN_NODE = """document.getElementById('{plot_id}').on('plotly_click', function (e) {
  var p = e.points && e.points[0];
  if (p && Array.isArray(p.customdata) && p.customdata[0]) { window.location.href = p.customdata[0]; }
});"""


def _target(sid: str, j: int, shared: dict[str, set], text: str | None = None) -> dict:
    """A feature named in a table: linked when its page is in the bundle, plain text otherwise."""
    href = f"../{safe_name(sid)}/{int(j)}.html" if int(j) in shared.get(sid, ()) else None
    return {"href": href, "text": text if text is not None else f"{sid} #{int(j)}"}


def feature_page(idx: FeatureIndex, sid: str, f: int, shared: dict[str, set], train: str,
                 explanations: dict | None = None) -> str:
    """One feature's page; `explanations` ({sid: column}, read once per bundle) name the lineage's features."""
    explanations = explanations if explanations is not None else all_explanations(idx)
    rec = idx.feature(sid, f)
    info = idx.info(sid)
    layers = info["cfg"].get("layers") or [int(k.rsplit(".", 1)[1]) for k in info["cfg"].get("in_keys", [])]
    multi = info["mode"] == "multilayer"

    def labels(values, slots):
        return [f"{v:.3g}" + (f" @ layer {layers[int(s)]}" if multi else "") for v, s in zip(values, slots)]

    ok = rec["top_row"] >= 0
    top = contexts_html(rec["top_tokens"][ok], rec["top_acts"][ok], labels(rec["top_value"][ok], rec["top_slot"][ok]),
                        idx.token_str, float(rec["max_act"]))
    intervals = []
    ok = rec["sample_row"] >= 0
    for q in np.unique(rec["sample_interval"][ok]):
        m = rec["sample_interval"][ok] == q
        intervals.append({"number": int(q) + 1, "contexts": contexts_html(
            rec["sample_tokens"][ok][m], rec["sample_acts"][ok][m],
            labels(rec["sample_value"][ok][m], rec["sample_slot"][ok][m]), idx.token_str, float(rec["max_act"]))})
    figures = []
    if float(rec["hist_hi"]) > 0:
        figures.append(fig_html(charts.activation_histogram(np.asarray(rec["hist_counts"]), float(rec["hist_hi"]))))
    logits = []
    if "logit_top_ids" in rec:
        logits = [{"promoted": visible_token(idx.token_str(int(a))), "promoted_value": float(av),
                   "suppressed": visible_token(idx.token_str(int(b))), "suppressed_value": float(bv)}
                  for a, av, b, bv in zip(rec["logit_top_ids"], rec["logit_top_vals"], rec["logit_bottom_ids"],
                                          rec["logit_bottom_vals"])]
    depth_figures = []
    if "layer_mass" in rec:
        depth_figures.append(fig_html(charts.layer_profile(layers, rec["layer_mass"])))
    if "decoder_layer_norm" in rec:
        out_layers = [int(k.rsplit(".", 1)[1]) for k in info["cfg"]["out_keys"]]
        depth_figures.append(fig_html(charts.layer_profile(out_layers, rec["decoder_layer_norm"], "decoder norm per layer")))
    cycle = flow_graph.life_cycle(layers, rec["layer_mass"]) if "layer_mass" in rec else None
    lin, causal = flow_graph.lineage(idx, sid, f)
    lineage = {direction: [{**e, "target": _target(e["sae"], e["feature"], shared),
                            "methods": ", ".join(flow_graph.methods_of(e["agree"])) or "—",
                            "explanation": str(explanations[e["sae"]][e["feature"]])
                            if explanations.get(e["sae"]) is not None else ""} for e in entries]
               for direction, entries in lin.items()}
    heads = heads_figures.feature_heads(rec, layers, multi, idx.token_str)
    if heads is not None:
        heads["figures"] = [fig_html(fig) for fig in heads["figures"]]
    return TEMPLATES.get_template("feature.html").render(
        css=CSS, root="../", sid=sid, feature=int(f), train=train,
        explanation=rec.get("explanation"), explanation_score=float(rec.get("explanation_score", float("nan"))),
        frequency=float(rec["frequency"]), count=int(rec["count"]), mean_act=float(rec["mean_act"]),
        max_act=float(rec["max_act"]), top_contexts=top, intervals=intervals, figures=figures, logits=logits,
        neighbours=[{"target": _target(sid, j, shared, f"#{int(j)}"), "cos": float(c)}
                    for j, c in zip(rec["neighbour_idx"], rec["neighbour_cos"])],
        depth_figures=depth_figures, cycle=cycle, lineage=lineage, causal=causal, heads=heads)


def all_explanations(idx: FeatureIndex) -> dict:
    return {s: idx.column(s, "explanation") for s in idx.sae_ids}


def flow_page(idx: FeatureIndex, shared: dict[str, set], train: str, explanations: dict) -> str | None:
    """The flow graph of the index's strongest links (as the app's Flow page opens) with a link per node; None
    when the index has no links."""
    links, causal = flow_graph.all_links(idx)
    if not len(links):
        return None
    densities = {s: idx.column(s, "frequency") for s in idx.sae_ids}
    fl = flow_graph.flow(idx, links, causal, explanations, densities, FLOW_NODES)
    targets = [_target(s, f, shared) for s, f in zip(fl.nodes["sae"], fl.nodes["feature"])]
    for t in targets:  # flow.html sits at the bundle's root, beside the SAE folders
        t["href"] = t["href"][len("../"):] if t["href"] else None
    hrefs = [t["href"] or "" for t in targets]
    nodes = [{"sae": s, "target": t, "explanation": e, "density": float(d)}
             for s, t, e, d in zip(fl.nodes["sae"], targets, fl.nodes["explanation"], fl.nodes["density"])]
    order = sorted(range(len(nodes)), key=lambda k: (int(fl.nodes["column"][k]), int(fl.nodes["feature"][k])))
    return TEMPLATES.get_template("flow.html").render(
        css=CSS, root="", train=train, causal=causal, n_links=len(links), n_shown=len(fl.links),
        figure=fig_html(charts.flow_figure(fl, hrefs), OPEN_NODE), nodes=[nodes[k] for k in order])


def index_page(idx: FeatureIndex, chosen: dict[str, list[int]], train: str, run_name: str, flow: bool) -> str:
    saes = []
    for sid, feats in chosen.items():
        expl = idx.column(sid, "explanation")
        freq, mx = idx.column(sid, "frequency"), idx.column(sid, "max_act")
        saes.append({"id": sid, "n_latents": idx.n_latents(sid), "rows": [
            {"feature": f, "href": f"{safe_name(sid)}/{f}.html", "frequency": float(freq[f]), "max_act": float(mx[f]),
             "explanation": str(expl[f]) if expl is not None else ""} for f in feats]})
    residual = fig_html(charts.residual_similarity(idx.residual_similarity)) if idx.residual_similarity else ""
    return TEMPLATES.get_template("index.html").render(
        css=CSS, root="", run_name=run_name, train=train, tokens=int(idx.meta.get("tokens", 0)),
        model=str(idx.meta.get("model", {}).get("id", "?")), residual_figure=residual, saes=saes, flow=flow)


def check_output(final: Path) -> None:
    """Refuse, before anything is written, an output Strata may not replace: a user's folder or file, and the
    `.partial` / `.old` folders beside it that a bundle uses while it is swapped in."""
    hint = "pass --out a new or empty folder (or an earlier bundle) to write the bundle there"
    if final.parent.exists() and not final.parent.is_dir():
        raise StrataError(f"{final.parent} is a file, so {final} cannot be a folder: {hint}")
    check_swap_target(final, KIND, hint)


def write_share(run, features: str = "top:100", train: str | None = None, out=None) -> Path:
    """Write the bundle; returns the folder (RUN/share by default)."""
    run = data.check_run(run)
    final = Path(out) if out else layout.share_dir(run)
    check_output(final)
    names = data.index_names(run)
    if not names:
        raise StrataError(f"{run} has no feature index; run `strata analyze {run}` first")
    train = train or names[0]
    if train not in names:
        raise StrataError(f"no index for training run {train!r}; choose one of {', '.join(names)}")
    # a bundle written into the run holds it like every other writer, so no harvest replaces it meanwhile
    lock = run_lock(run, "strata share", scope="share") if data.within(run, final) else contextlib.nullcontext()
    with lock:
        check_output(final)  # again, now that no other share can be writing there
        idx = FeatureIndex(layout.index_path(run, train))
        try:
            chosen = select_features(idx, features)
            _write_bundle(idx, chosen, train, run.name, final)
        finally:
            idx.close()
    return final


def _write_bundle(idx: FeatureIndex, chosen: dict[str, list[int]], train: str, run_name: str, final: Path) -> None:
    from plotly.offline import get_plotlyjs

    try:
        with staged_dir(final, KIND) as tmp:
            (tmp / "assets").mkdir()
            (tmp / "assets" / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")
            shared = {s: set(v) for s, v in chosen.items()}
            explanations = all_explanations(idx)
            for sid, feats in chosen.items():
                folder = tmp / safe_name(sid)
                folder.mkdir()
                for f in feats:
                    (folder / f"{f}.html").write_text(feature_page(idx, sid, f, shared, train, explanations), encoding="utf-8")
            flow = flow_page(idx, shared, train, explanations)
            if flow is not None:
                (tmp / "flow.html").write_text(flow, encoding="utf-8")
            (tmp / "index.html").write_text(index_page(idx, chosen, train, run_name, flow is not None),
                                            encoding="utf-8")
    except OSError as e:
        raise StrataError(f"could not write the bundle to {final} ({e.strerror or e}); check that the folder "
                          "is writable and has space, then rerun") from None
