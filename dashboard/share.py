"""`strata share RUN [--name NAME] --features SPEC`: a static HTML bundle of chosen feature pages that opens with
no Python and no network. Every training run with a feature index is shared (or the one `--name` picks):

  index.html                         the training runs, each linked, with what was chosen from it
  train/<name>/index.html            that run's chosen features, per SAE, with their explanations
  train/<name>/<sae>/<feature>.html  one page per feature, with its lineage (and heads, for attn_out SAEs)
  train/<name>/flow.html             the flow graph of matched features, when the index has any
  train/<name>/graphs/<graph>.html   every saved attribution graph of that run (RUN/graphs/<name>/<graph>.json) as
                                     the Circuits page draws it, supernodes shown
  assets/plotly.min.js               copied from the installed plotly package (no CDN)

Written to a temporary folder and swapped in whole; the output folder may only be missing, empty, or an earlier
bundle (activations/ownership.py); an earlier bundle of the one-run layout (<sae>/<feature>.html beside
index.html) is replaced like any other.

The pages are Jinja2 templates (dashboard/templates/) rendered with autoescape on: every value is escaped
unless it is Markup, and the only Markup passed in is what dashboard/render.py built (token contexts, escaped
exactly as in the app) and plotly's own figure HTML.

SPEC: "best:N" (the default, best:100: the first N of each SAE in the Features page's default order,
sae/analysis/ranking.py: explanation score, always-on and outlier-only features set aside); "top:N" (the N
densest); "all"; "3,7,10-20" (those indices in every SAE); "resid.3:1,2;resid.6:5" (per SAE; with several
training runs, in each run that has that SAE).
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
from sae.analysis.ranking import FLAG_HELP, formatting_features, ranked_features

KIND = "share"
DEFAULT_SPEC = "best:100"
SPEC_HELP = "use best:N, top:N, all, 1,2,5-9 or sae:1,2;sae2:3"
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


def _count(spec: str, kind: str) -> int:
    """N of "best:N" / "top:N"."""
    k = int(spec[len(kind) + 1:]) if re.fullmatch(r"[0-9]+", spec[len(kind) + 1:]) else 0
    if k <= 0:
        raise StrataError(f"bad feature spec {spec!r}; write {kind}:N with N > 0")
    return k


def best_features(idx: FeatureIndex, sid: str) -> tuple[np.ndarray, dict[str, int]]:
    """(the SAE's features in the Features page's default order, without always-on and outlier-only ones;
    {flag: how many were set aside})."""
    col = idx.column
    return ranked_features(col(sid, "explanation_score"), col(sid, "frequency"), col(sid, "mean_act"),
                           col(sid, "max_act"), col(sid, "explanation"),
                           formatting_features(col(sid, "top_tokens"), col(sid, "top_value"), idx.vocab))


def per_sae_parts(spec: str) -> list[tuple[str, str]] | None:
    """[(sae id, feature list)] of a per-SAE spec "sae:1,2;sae2:3", None for the other forms."""
    spec = spec.strip()
    if spec == "all" or re.match(r"(best|top):", spec) or ":" not in spec:
        return None
    return [tuple(x.strip() for x in part.partition(":")[::2]) for part in spec.split(";") if part.strip()]


def select_features(idx: FeatureIndex, spec: str, only_present: bool = False) -> dict[str, list[int]]:
    """{sae id: feature indices} chosen by `spec` (see the module docstring), ascending, or best first for best:N
    (the bundle lists them in this order); with `only_present`, the parts of a per-SAE spec that name an SAE this
    index lacks are skipped instead of refused."""
    spec = spec.strip()
    if not spec:
        raise StrataError(f"--features is empty; {SPEC_HELP}")
    if spec == "all":
        return {s: list(range(idx.n_latents(s))) for s in idx.sae_ids}
    if spec.startswith("best:"):
        k = _count(spec, "best")
        return {s: best_features(idx, s)[0][:k].tolist() for s in idx.sae_ids}  # best first
    if spec.startswith("top:"):
        k = _count(spec, "top")
        return {s: sorted(np.argsort(-idx.column(s, "frequency"), kind="stable")[:k].tolist()) for s in idx.sae_ids}
    parts = per_sae_parts(spec)
    if parts is not None:
        out: dict[str, list[int]] = {}
        for sid, lst in parts:
            if only_present and sid not in idx.sae_ids:
                continue
            chosen = _indices(lst, sid, idx.n_latents(sid))  # n_latents raises for an unknown SAE
            out[sid] = sorted(set(out.get(sid, [])) | set(chosen))
        return out
    return {s: _indices(spec, s, idx.n_latents(s)) for s in idx.sae_ids}


def selection_note(idx: FeatureIndex, spec: str) -> str:
    """What `spec` chose, in words, for the bundle's pages (what a best:N selection set aside included)."""
    spec = spec.strip()
    if spec.startswith("best:"):
        aside = {sid: best_features(idx, sid)[1] for sid in idx.sae_ids}
        totals = {flag: sum(a[flag] for a in aside.values()) for flag in FLAG_HELP}
        left = "; ".join(f"{n} {flag} ({FLAG_HELP[flag]})" for flag, n in totals.items() if n)
        return (f"the {_count(spec, 'best')} most interpretable features of each SAE (explanation score, best "
                "first; features peaking mostly on whitespace or punctuation and repeated explanations after the "
                "rest)" + (f"; left out: {left}" if left else ""))
    if spec.startswith("top:"):
        return f"the {_count(spec, 'top')} densest features of each SAE"
    return "every feature" if spec == "all" else f"the features listed ({spec})"


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
        css=CSS, root="../../../", sid=sid, feature=int(f), train=train,
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
    for t in targets:  # flow.html sits in train/<name>/, beside the SAE folders
        t["href"] = t["href"][len("../"):] if t["href"] else None
    hrefs = [t["href"] or "" for t in targets]
    nodes = [{"sae": s, "target": t, "explanation": e, "density": float(d)}
             for s, t, e, d in zip(fl.nodes["sae"], targets, fl.nodes["explanation"], fl.nodes["density"])]
    order = sorted(range(len(nodes)), key=lambda k: (int(fl.nodes["column"][k]), int(fl.nodes["feature"][k])))
    return TEMPLATES.get_template("flow.html").render(
        css=CSS, root="../../", train=train, causal=causal, n_links=len(links), n_shown=len(fl.links),
        figure=fig_html(charts.flow_figure(fl, hrefs), OPEN_NODE), nodes=[nodes[k] for k in order])


# a click on a circuit node opens its feature page: customdata is [node_id, href] (href "" when not shared)
OPEN_CIRCUIT_NODE = OPEN_NODE.replace("p.customdata[0]", "p.customdata[1]")


def circuit_page(graph: dict, train: str, name: str, shared: dict[str, set]) -> str:
    """One saved graph of training run `train` as the Circuits page draws it (train/<name>/graphs/<graph>.html); a
    feature whose page is in the bundle links to it."""
    hrefs = {}
    for n in graph["nodes"]:
        sid, f = n.get("sae"), int(n.get("feature", -1))
        if sid and f in shared.get(sid, ()):
            hrefs[n["node_id"]] = f"../{safe_name(sid)}/{f}.html"
    pinned = charts.pinned_ids(graph)
    nodes = [{"node_id": n["node_id"], "label": charts.node_label(n), "layer": n["layer"], "ctx_idx": n["ctx_idx"],
              "influence": float(n.get("influence") or 0), "href": hrefs.get(n["node_id"]),
              "pinned": n["node_id"] in pinned} for n in graph["nodes"]]
    return TEMPLATES.get_template("circuit.html").render(
        css=CSS, root="../../../", train=train, name=name, prompt=graph["metadata"].get("prompt", ""),
        n_links=len(graph["links"]), max_links=charts.MAX_LINKS, nodes=nodes, pinned=pinned,
        supernodes=[{"label": g[0], "members": g[1:]} for g in graph["qParams"]["supernodes"]],
        figure=fig_html(charts.circuit_figure(graph, hrefs=hrefs), OPEN_CIRCUIT_NODE))


def index_page(idx: FeatureIndex, chosen: dict[str, list[int]], train: str, run_name: str, note: str = "",
               flow: bool = False, circuits: list[dict] = ()) -> str:
    """train/<name>/index.html: the run's chosen features, per SAE (in the order chosen for a best:N selection)."""
    saes = []
    for sid, feats in chosen.items():
        expl = idx.column(sid, "explanation")
        freq, mx = idx.column(sid, "frequency"), idx.column(sid, "max_act")
        score = idx.column(sid, "explanation_score")
        saes.append({"id": sid, "n_latents": idx.n_latents(sid), "rows": [
            {"feature": f, "href": f"{safe_name(sid)}/{f}.html", "frequency": float(freq[f]), "max_act": float(mx[f]),
             "score": float(score[f]) if score is not None else float("nan"),
             "explanation": str(expl[f]) if expl is not None else ""} for f in feats]})
    residual = fig_html(charts.residual_similarity(idx.residual_similarity)) if idx.residual_similarity else ""
    return TEMPLATES.get_template("index.html").render(
        css=CSS, root="../../", home="../../index.html", run_name=run_name, train=train,
        tokens=int(idx.meta.get("tokens", 0)), model=str(idx.meta.get("model", {}).get("id", "?")),
        residual_figure=residual, saes=saes, selection=note, flow=flow, circuits=list(circuits))


def runs_page(runs: list[dict], run_name: str) -> str:
    """index.html: every shared training run, linked. `runs`: [{name, idx, chosen, note}]."""
    rows = [{"name": r["name"], "href": f"train/{safe_name(r['name'])}/index.html",
             "model": str(r["idx"].meta.get("model", {}).get("id", "?")), "tokens": int(r["idx"].meta.get("tokens", 0)),
             "explainer": str(r["idx"].meta.get("explainer", "?")),
             "saes": [{"id": sid, "shared": len(feats), "n_latents": r["idx"].n_latents(sid)}
                      for sid, feats in r["chosen"].items()], "selection": r["note"]} for r in runs]
    return TEMPLATES.get_template("runs.html").render(css=CSS, root="", run_name=run_name, runs=rows)


def check_output(final: Path) -> None:
    """Refuse, before anything is written, an output Strata may not replace: a user's folder or file, and the
    `.partial` / `.old` folders beside it that a bundle uses while it is swapped in."""
    hint = "pass --out a new or empty folder (or an earlier bundle) to write the bundle there"
    if final.parent.exists() and not final.parent.is_dir():
        raise StrataError(f"{final.parent} is a file, so {final} cannot be a folder: {hint}")
    check_swap_target(final, KIND, hint)


def write_share(run, features: str = DEFAULT_SPEC, train: str | None = None, out=None) -> Path:
    """Write the bundle of every training run with an index (or of `train` alone); returns the folder
    (RUN/share by default)."""
    run = data.check_run(run)
    final = Path(out) if out else layout.share_dir(run)
    check_output(final)
    names = data.index_names(run)
    if not names:
        raise StrataError(f"{run} has no feature index; run `strata analyze {run}` first")
    if train is not None and layout.check_name(train) not in names:
        raise StrataError(f"no index for training run {train!r}; choose one of {', '.join(names)} (or leave out "
                          "--name to share every one)")
    names = [train] if train is not None else names
    # a bundle written into the run holds it like every other writer, so no harvest replaces it meanwhile
    lock = run_lock(run, "strata share", scope="share") if data.within(run, final) else contextlib.nullcontext()
    with lock, contextlib.ExitStack() as opened:
        check_output(final)  # again, now that no other share can be writing there
        runs = []
        for name in names:
            idx = FeatureIndex(layout.index_path(run, name))
            opened.callback(idx.close)
            runs.append({"name": name, "idx": idx})
        for r in runs:  # every selection is checked before anything is written
            r["chosen"] = select_features(r["idx"], features, only_present=len(runs) > 1)
            r["note"] = selection_note(r["idx"], features)
            r["graphs"] = {g: data.read_graph(run, t, g) for t, g in data.graph_names(run) if t == r["name"]}
        _check_named_saes(features, runs)
        _write_bundle(runs, run.name, final)
    return final


def _check_named_saes(spec: str, runs: list[dict]) -> None:
    """Every SAE a per-SAE spec names must be in at least one shared run."""
    for sid, _ in per_sae_parts(spec) or []:
        if not any(sid in r["idx"].sae_ids for r in runs):
            have = sorted({s for r in runs for s in r["idx"].sae_ids})
            raise StrataError(f"no SAE {sid!r} in the indexes of {', '.join(r['name'] for r in runs)}; choose one "
                              f"of {', '.join(have)}")


def _write_run(r: dict, run_name: str, folder: Path) -> None:
    """One training run's pages into `folder` (train/<name>/ of the bundle)."""
    idx, chosen, name = r["idx"], r["chosen"], r["name"]
    shared = {s: set(v) for s, v in chosen.items()}
    explanations = all_explanations(idx)
    for sid, feats in chosen.items():
        (folder / safe_name(sid)).mkdir(parents=True)
        for f in feats:
            (folder / safe_name(sid) / f"{f}.html").write_text(feature_page(idx, sid, f, shared, name, explanations),
                                                              encoding="utf-8")
    flow = flow_page(idx, shared, name, explanations)
    if flow is not None:
        (folder / "flow.html").write_text(flow, encoding="utf-8")
    circuits = []
    for g, graph in r.get("graphs", {}).items():
        (folder / "graphs").mkdir(exist_ok=True)
        (folder / "graphs" / f"{g}.html").write_text(circuit_page(graph, name, g, shared), encoding="utf-8")
        circuits.append({"train": name, "name": g, "href": f"graphs/{g}.html",
                         "prompt": str(graph["metadata"].get("prompt", ""))})
    (folder / "index.html").write_text(index_page(idx, chosen, name, run_name, r["note"], flow is not None, circuits),
                                       encoding="utf-8")


def _write_bundle(runs: list[dict], run_name: str, final: Path) -> None:
    from plotly.offline import get_plotlyjs

    try:
        with staged_dir(final, KIND) as tmp:
            (tmp / "assets").mkdir()
            (tmp / "assets" / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")
            for r in runs:
                folder = tmp / "train" / safe_name(r["name"])
                folder.mkdir(parents=True)
                _write_run(r, run_name, folder)
            (tmp / "index.html").write_text(runs_page(runs, run_name), encoding="utf-8")
    except OSError as e:
        raise StrataError(f"could not write the bundle to {final} ({e.strerror or e}); check that the folder "
                          "is writable and has space, then rerun") from None
