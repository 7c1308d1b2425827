"""Overview: the harvest manifest, training curves, a per-SAE table, feature densities, the sweep frontier."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import cache, charts, data
from dashboard.views.common import Ctx


def sae_table(ctx: Ctx, name: str) -> pd.DataFrame:
    """L0, FVU, dead %, loss recovered from eval.json, and the other suites' headline metrics (absorption,
    probing, autointerp) where eval ran them; L0 and dead % measured by the index when eval is absent."""
    results = data.eval_results(ctx.run, name)
    idx = cache.open_index(ctx.run, name) if name in ctx.trains else None
    ids = list(idx.sae_ids) if idx else []
    ids += [s for s in results if s not in ids]
    rows = []
    for sid in ids:
        r = results.get(sid, {})
        row = {"SAE": sid}
        for column in data.EVAL_COLUMNS:
            row[column] = data.eval_metric(r, column)
        if idx and sid in idx.sae_ids:
            info = idx.info(sid)
            freq = cache.column(ctx.run, name, sid, "frequency")
            row["latents"] = info["n_latents"]
            row["mode"] = info["mode"]
            row["keys"] = ", ".join(info["cfg"].get("in_keys", []))
            row["L0 (index)"] = float(np.sum(freq))  # mean active latents per encoded vector
            row["dead % (index)"] = 100.0 * float(np.mean(freq == 0))
        rows.append(row)
    table = pd.DataFrame(rows)
    unmeasured = [c for c in data.EVAL_COLUMNS if c not in data.CORE_COLUMNS and c in table and table[c].isna().all()]
    return table.drop(columns=unmeasured)


def axis_label(metric: str) -> str:
    return {"l0": "L0", "fvu": "FVU"}.get(metric, metric)


def choose_axes(metrics: list[str], key: str) -> tuple[str, str]:
    """Two eval metrics for a frontier's axes (default L0 and FVU)."""
    c = st.columns(2)
    x = c[0].selectbox("x axis", metrics, index=metrics.index("l0") if "l0" in metrics else 0, key=f"fx-{key}")
    y = c[1].selectbox("y axis", metrics, index=metrics.index("fvu") if "fvu" in metrics else 0, key=f"fy-{key}")
    return x, y


def frontier_chart(points: list[dict], x: str, y: str, key: str) -> None:
    from sae.evals import higher_is_better

    front = data.pareto_front(points, maximize_y=higher_is_better(y))
    st.plotly_chart(charts.frontier(points, front, axis_label(x), axis_label(y)), key=key)


def render(ctx: Ctx) -> None:
    st.header("Overview")
    man = data.manifest(ctx.run)
    model = man.get("model", {})
    c = st.columns(4)
    c[0].metric("model", str(model.get("id", "?"))[-40:])
    c[1].metric("layers × d_model", f"{model.get('n_layers', '?')} × {model.get('d_model', '?')}")
    c[2].metric("tokens harvested", f"{int(man.get('n_tokens', 0)):,}")
    c[3].metric("shards", len(man.get("shards", [])))
    st.write("Harvested keys: " + ", ".join(f"`{k}`" for k in man.get("keys", [])))
    with st.expander("manifest.json"):
        st.json({k: v for k, v in man.items() if k != "shards"}, expanded=False)

    trains = data.train_names(ctx.run)
    if not trains:
        st.info(f"No training runs yet: `strata train {ctx.run}`.")
        return
    st.subheader("Training")
    for name in trains:
        rows = data.metrics(ctx.run, name)
        st.markdown(f"**{name}** — {len(rows)} logged steps" + ("" if name in ctx.trains else " (not analysed yet)"))
        if rows:
            names = charts.numeric_metrics(rows)
            default = [m for m in ("fvu", "l0", "loss") if m in names] or names[:1]
            chosen = st.multiselect("metrics", names, default=default[:2], key=f"metrics-{name}")
            cols = st.columns(max(1, len(chosen)))
            for col, m in zip(cols, chosen):
                col.plotly_chart(charts.training_curves(rows, m), key=f"curve-{name}-{m}")
        table = sae_table(ctx, name)
        if len(table):
            st.dataframe(table, hide_index=True)
        per_key = data.eval_per_key(ctx.run, name)
        if per_key:
            with st.expander(f"{name}: eval metrics per layer ({len(per_key)} SAE × key rows)"):
                st.dataframe(pd.DataFrame(per_key), hide_index=True, key=f"per-key-{name}")

    if ctx.train:
        idx = cache.open_index(ctx.run, ctx.train)
        st.subheader(f"Feature density — {ctx.train}")
        st.caption(f"index over {int(idx.meta.get('tokens', 0)):,} tokens ({idx.meta.get('data')} shards)")
        freqs = {sid: cache.column(ctx.run, ctx.train, sid, "frequency") for sid in idx.sae_ids}
        st.plotly_chart(charts.density_histogram(freqs), key="density")
        for note in idx.meta.get("notes", []):
            st.caption(note)

    sweeps = data.sweep_summaries(ctx.run)
    for name, members in sweeps.items():
        values = [{**{k: m.get(k) for k in ("l0", "fvu", "loss_recovered", "dead_fraction")},
                   **(m.get("evals") if isinstance(m.get("evals"), dict) else {})} for m in members]
        metrics = data.numeric_metrics(values) or ["l0", "fvu"]
        x, y = ("l0", "fvu") if len(metrics) < 2 else choose_axes(metrics, name)
        st.subheader(f"Sweep {name}: {axis_label(x)}–{axis_label(y)} frontier")
        points = [{"train": m.get("name", "?"), "sae": "mean over SAEs", "x": v[x], "y": v[y]}
                  for m, v in zip(members, values) if data.eval_number(v.get(x)) is not None
                  and data.eval_number(v.get(y)) is not None]
        if points:
            frontier_chart(points, x, y, f"frontier-{name}")
        st.dataframe(pd.DataFrame([{"member": m.get("name"), "status": m.get("status"),
                                    **{k: str(v) for k, v in (m.get("params") or {}).items()},
                                    "L0": m.get("l0"), "FVU": m.get("fvu"), "loss recovered": m.get("loss_recovered"),
                                    "dead fraction": m.get("dead_fraction"), "frontier": m.get("frontier")}
                                   for m in members]), hide_index=True, key=f"sweep-table-{name}")
    if sweeps:
        return
    # no sweep summary: every evaluated SAE of every training run, on any two eval metrics
    overalls = [o for name in trains for o in data.eval_results(ctx.run, name).values()]
    if len(overalls) < 2:
        return
    metrics = data.numeric_metrics(overalls)
    if len(metrics) < 2:
        return
    st.subheader("Evaluated SAEs: frontier")
    x, y = choose_axes(metrics, "evaluated")
    points = data.sweep_points(ctx.run, x, y)
    if len(points) >= 2:
        frontier_chart(points, x, y, "frontier")
