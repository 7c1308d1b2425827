"""Overview: the harvest manifest, training curves, a per-SAE table, feature densities, the sweep frontier."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import cache, charts, data
from dashboard.views.common import Ctx


def sae_table(ctx: Ctx, name: str) -> pd.DataFrame:
    """L0, FVU, dead %, loss recovered from eval.json; L0 and dead % measured by the index when eval is absent."""
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
    return pd.DataFrame(rows)


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
        st.subheader(f"Sweep {name}: L0–FVU frontier")
        points = [{"train": m.get("name", "?"), "sae": "mean over SAEs", "L0": m["l0"], "FVU": m["fvu"]}
                  for m in members if isinstance(m.get("l0"), (int, float)) and isinstance(m.get("fvu"), (int, float))]
        if points:
            st.plotly_chart(charts.frontier(points, data.pareto_front(points)), key=f"frontier-{name}")
        st.dataframe(pd.DataFrame([{"member": m.get("name"), "status": m.get("status"),
                                    **{k: str(v) for k, v in (m.get("params") or {}).items()},
                                    "L0": m.get("l0"), "FVU": m.get("fvu"), "loss recovered": m.get("loss_recovered"),
                                    "dead fraction": m.get("dead_fraction"), "frontier": m.get("frontier")}
                                   for m in members]), hide_index=True, key=f"sweep-table-{name}")
    points = data.sweep_points(ctx.run)
    if not sweeps and len(points) >= 2:  # no sweep summary: every evaluated SAE of every training run
        st.subheader("Evaluated SAEs: L0–FVU frontier")
        st.plotly_chart(charts.frontier(points, data.pareto_front(points)), key="frontier")
