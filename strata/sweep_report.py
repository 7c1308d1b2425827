"""Sweep results: summary.json (one row per member), frontier.html (L0 vs FVU, and vs loss recovered when the
members were evaluated, with the Pareto frontier highlighted) and a printed table.

RUN/sweeps/<sweep>/summary.json — the dashboard's Overview page reads it:
    {"sweep": name, "run": run_dir,
     "members": [{"name": "<sweep>-<i>", "config": {TrainConfig fields but run_dir, name, resume...}, "params": {the swept fields},
                  "status": "finished" | "failed" | "interrupted" | ..., "error": one line or "",
                  "l0", "fvu", "loss_recovered", "dead_fraction",   # floats (means over the member's SAEs) or null
                  "source": "eval" | "train" | null,                # where the numbers come from
                  "frontier": bool,                                  # on the L0-FVU Pareto frontier
                  "evals": {metric: mean over the member's SAEs} of every other number in eval.json's
                           per-SAE "overall" (every suite eval ran: absorption_mean, probing_k1_accuracy, ...),
                  "saes": {sae_id: {"l0", "fvu", "loss_recovered", "dead_fraction", and those eval metrics}}}]}
Numbers come from RUN/train/<member>/eval.json (held-out shards; loss_recovered = CE loss recovered) when the
member was evaluated, else from the last record of its metrics.jsonl (the last training batches; no loss recovered).

frontier.html is one self-contained page: plotly.js is inlined from the installed plotly package (opens offline).
Panels: FVU vs L0, CE loss recovered vs L0 (when evaluated), and, when the members' eval.json hold other
metrics, one more panel whose y axis is picked from a menu among all of them (the Pareto frontier recomputed
for each; sae.evals.higher_is_better says which way is better).
"""
from __future__ import annotations

import dataclasses
import html
import json

from activations import layout
from activations.atomic import atomic_write_bytes, atomic_write_json

METRICS = ("l0", "fvu", "loss_recovered", "dead_fraction")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mean(values):
    vals = [v for v in values if isinstance(v, (int, float))]
    return sum(vals) / len(vals) if vals else None


def member_metrics(run, name: str) -> tuple[dict, str | None]:
    """{sae_id: {metric: value}} of one trained member, and where they come from ('eval', 'train' or None)."""
    tdir = layout.train_dir(run, name)
    if (tdir / "eval.json").is_file():
        saes = json.loads((tdir / "eval.json").read_text())["saes"]
        return {sid: {**{m: v for m, v in r["overall"].items() if _number(v)},
                      "l0": r["overall"].get("l0"), "fvu": r["overall"].get("fvu"),
                      "loss_recovered": r["overall"].get("ce_loss_recovered"),
                      "dead_fraction": r["overall"].get("frac_dead")} for sid, r in saes.items()}, "eval"
    path = layout.metrics_path(run, name)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    if not lines:
        return {}, None
    saes = json.loads(lines[-1]).get("saes", {})
    return {sid: {"l0": m.get("l0"), "fvu": m.get("fvu"), "loss_recovered": None,
                  "dead_fraction": m.get("frac_dead")} for sid, m in saes.items()}, "train"


def _config(cfg) -> dict:
    """The member's TrainConfig without the fields the sweep sets itself (run, name, resume...)."""
    from strata.sweep_config import SET_BY_SWEEP

    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in SET_BY_SWEEP}


def pareto(points: list[tuple[float, float]], maximize_y: bool = False) -> set[int]:
    """Indices of the points no other point beats: lower x and lower y (or higher y when maximize_y)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if maximize_y else points[i][1]))
    best, front = None, set()
    for i in order:
        y = -points[i][1] if maximize_y else points[i][1]
        if best is None or y < best:
            front.add(i)
            best = y
    return front


# eval.json names of the METRICS columns (and l0): not repeated in a member's "evals"
_SHOWN = {"l0", "fvu", "ce_loss_recovered", "loss_recovered", "frac_dead", "dead_fraction"}


def _eval_means(saes: dict) -> dict:
    names = sorted({m for s in saes.values() for m, v in s.items() if _number(v)} - _SHOWN)
    return {m: _mean(s.get(m) for s in saes.values()) for m in names}


def summarize(sweep) -> dict:
    rows = []
    for m in sweep.members:
        saes, source = member_metrics(sweep.run, m.name) if m.status == "finished" else ({}, None)
        row = {"name": m.name, "config": _config(m.config), "params": m.params,
               "status": m.status, "error": m.error, **{k: _mean(s.get(k) for s in saes.values()) for k in METRICS},
               "source": source, "frontier": False, "saes": saes, "evals": _eval_means(saes)}
        rows.append(row)
    scored = [r for r in rows if r["l0"] is not None and r["fvu"] is not None]
    for i in pareto([(r["l0"], r["fvu"]) for r in scored]):
        scored[i]["frontier"] = True
    return {"sweep": sweep.name, "run": sweep.run, "members": rows}


def frontier_figure(summary: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from sae.evals import higher_is_better

    rows = [r for r in summary["members"] if r["l0"] is not None]
    panels = [("fvu", "FVU (lower is better)", False)]
    if any(r["loss_recovered"] is not None for r in rows):
        panels.append(("loss_recovered", "CE loss recovered (higher is better)", True))
    extra = sorted({m for r in rows for m, v in (r.get("evals") or {}).items() if v is not None})
    titles = [f"{t.split(' (')[0]} vs L0" for _, t, _ in panels] + (["eval metric (pick above) vs L0"] if extra else [])
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles)

    def value(r, metric):
        return r[metric] if metric in METRICS else (r.get("evals") or {}).get(metric)

    def traces(metric, maximize):
        pts = [r for r in rows if value(r, metric) is not None]
        front = sorted((pts[i] for i in pareto([(r["l0"], value(r, metric)) for r in pts], maximize)),
                       key=lambda r: r["l0"])
        return pts, front

    def add_panel(col, metric, title, maximize):
        pts, front = traces(metric, maximize)
        fig.add_trace(go.Scatter(x=[r["l0"] for r in pts], y=[value(r, metric) for r in pts], mode="markers",
                                 marker=dict(size=10, color="#9aa5b1"), name="members", legendgroup="members",
                                 showlegend=col == 1, hovertext=[_hover(r) for r in pts], hoverinfo="text"),
                      row=1, col=col)
        fig.add_trace(go.Scatter(x=[r["l0"] for r in front], y=[value(r, metric) for r in front], mode="lines+markers",
                                 marker=dict(size=12, color="#d1495b"), line=dict(color="#d1495b"),
                                 name="Pareto frontier", legendgroup="frontier", showlegend=col == 1,
                                 hovertext=[_hover(r) for r in front], hoverinfo="text"), row=1, col=col)
        fig.update_yaxes(title_text=title, row=1, col=col)
        fig.update_xaxes(title_text="L0 (active latents per token)", row=1, col=col)

    for col, (metric, title, maximize) in enumerate(panels, 1):
        add_panel(col, metric, title, maximize)
    if extra:  # one more panel, its y axis any eval metric, picked from a menu
        col = len(panels) + 1
        def label(m):
            return f"{m} ({'higher' if higher_is_better(m) else 'lower'} is better)"
        add_panel(col, extra[0], label(extra[0]), higher_is_better(extra[0]))
        ids = [len(fig.data) - 2, len(fig.data) - 1]
        buttons = []
        for m in extra:
            pts, front = traces(m, higher_is_better(m))
            buttons.append(dict(label=m, method="update", args=[
                {"x": [[r["l0"] for r in pts], [r["l0"] for r in front]],
                 "y": [[value(r, m) for r in pts], [value(r, m) for r in front]],
                 "hovertext": [[_hover(r) for r in pts], [_hover(r) for r in front]]},
                {f"yaxis{col}.title.text": label(m)}, ids]))
        fig.update_layout(updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.18,
                                            yanchor="top", showactive=True)])
    n_done = sum(r["status"] == "finished" for r in summary["members"])
    fig.update_layout(title=f"sweep {html.escape(summary['sweep'])}: {n_done}/{len(summary['members'])} members "
                            f"finished (run {html.escape(str(summary['run']))})",
                      template="plotly_white", hovermode="closest")
    return fig


def _hover(r: dict) -> str:
    lines = [f"<b>{html.escape(r['name'])}</b>"] + [f"{html.escape(k)} = {html.escape(str(v))}" for k, v in r["params"].items()]
    lines += [f"{k}: {_fmt(r[k])}" for k in METRICS] + [f"{html.escape(k)}: {_fmt(v)}" for k, v in
                                                        (r.get("evals") or {}).items()]
    lines += [f"arch: {html.escape(str(r['config'].get('arch')))}, numbers from {r['source']}"]
    return "<br>".join(lines)


def write_report(sweep) -> dict:
    summary = summarize(sweep)
    atomic_write_json(layout.sweep_dir(sweep.run, sweep.name) / "summary.json", summary)
    page = frontier_figure(summary).to_html(include_plotlyjs=True, full_html=True)
    atomic_write_bytes(layout.sweep_dir(sweep.run, sweep.name) / "frontier.html", page.encode())
    return summary


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(summary: dict) -> str:
    """Plain-text table, one line per member; '*' marks the L0-FVU Pareto frontier; errors listed below."""
    params = list(dict.fromkeys(k for r in summary["members"] for k in r["params"]))
    head = ["member", "status", *params, "L0", "FVU", "loss rec", "dead", "front"]
    body = [[r["name"], r["status"], *[_fmt(r["params"].get(p)) for p in params],
             *[_fmt(r[k]) for k in METRICS], "*" if r["frontier"] else ""] for r in summary["members"]]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    lines += [f"{r['name']}: {r['status']}: {r['error']}" for r in summary["members"] if r["error"]]
    return "\n".join(lines)
