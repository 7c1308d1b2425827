"""Links between features across depth, as the Flow page, the lineage panel and the static bundle show them.

A link joins upstream feature `i` of SAE `up` to its best match `j` in SAE `down`. It comes from the index's
matches/<j> groups (causal best match; weight = causal effect, `agree` = bitmask of the methods whose own top
pick is the same feature) or, for an index written before those existed, from a per-layer bank's
best_next_{idx,corr,cos} (weight = activation correlation, the only method: correlation).

Nodes are (sae, feature); `flow(...)` picks a readable subgraph: the strongest links overall, or everything
linked to a starting feature or to features whose explanation contains a text (matched as plain text), up to
`max_nodes` nodes. Columns follow depth: resid.L sits before the sites of block L, which sit before resid.L+1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from sae.analysis.index_file import FeatureIndex

METHOD_BITS = {1: "cosine", 2: "correlation", 4: "causal", 8: "saematch"}
SITE_OFFSET = {"resid": 0.0, "attn_out": 0.25, "mlp_in": 0.5, "mlp_out": 0.75}
LINK_COLUMNS = ["up", "i", "down", "j", "weight", "effect", "corr", "cos", "agree", "kind"]  # + ukey, dkey


def methods_of(agree: int) -> list[str]:
    return [name for bit, name in METHOD_BITS.items() if int(agree) & bit]


def key_depth(key: str) -> float:
    """Position of an activation key along the forward pass: resid.3 -> 3, mlp_out.3 -> 3.75."""
    site, _, layer = key.rpartition(".")
    return int(layer) + SITE_OFFSET.get(site, 0.5) if layer.isdigit() else 0.0


def sae_depth(idx: FeatureIndex, sid: str) -> float:
    keys = idx.info(sid)["cfg"].get("in_keys") or [sid]
    return key_depth(keys[0])


def all_links(idx: FeatureIndex) -> tuple[pd.DataFrame, bool]:
    """(every link of the index, whether they are causal matches); columns LINK_COLUMNS."""
    parts, causal = [], bool(idx.matches())
    if causal:
        for m in idx.matches():
            a = idx.match_arrays(m["j"])
            rows = np.nonzero(a["best_idx"] >= 0)[0]
            parts.append(pd.DataFrame({
                "up": m["up"], "i": rows, "down": m["down"], "j": a["best_idx"][rows],
                "weight": np.nan_to_num(a["best_effect"][rows], nan=0.0), "effect": a["best_effect"][rows],
                "corr": a["best_corr"][rows], "cos": a["best_cos"][rows], "agree": a["agree"][rows].astype(int),
                "kind": m["kind"]}))
    else:
        for sid in idx.sae_ids:
            nxt = idx.info(sid).get("match_next")
            if not nxt or not idx.has(sid, "best_next_idx"):
                continue
            best = idx.column(sid, "best_next_idx")
            rows = np.nonzero(best >= 0)[0]
            corr = idx.column(sid, "best_next_corr")[rows]
            parts.append(pd.DataFrame({
                "up": sid, "i": rows, "down": nxt, "j": best[rows], "weight": corr, "effect": np.nan, "corr": corr,
                "cos": idx.column(sid, "best_next_cos")[rows], "agree": 2, "kind": "bank"}))
    links = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=LINK_COLUMNS)
    links = links[links["weight"] > 0].sort_values("weight", ascending=False, kind="stable").reset_index(drop=True)
    links["ukey"] = node_keys(links["up"], links["i"], idx.sae_ids)
    links["dkey"] = node_keys(links["down"], links["j"], idx.sae_ids)
    return links, causal


def matched_saes(idx: FeatureIndex) -> set[str]:
    """SAEs that take part in a matched pair (causal matches, or a bank's correlation matches)."""
    if idx.matches():
        return {s for m in idx.matches() for s in (m["up"], m["down"])}
    return {s for sid in idx.sae_ids if (nxt := idx.info(sid).get("match_next")) for s in (sid, nxt)}


def can_show_depth(idx: FeatureIndex) -> bool:
    """Depth views need two or more SAEs joined by links, a multi-layer SAE or a crosscoder."""
    return len(idx.sae_ids) >= 2 or any(idx.has(s, "layer_mass") or idx.has(s, "decoder_layer_norm")
                                        for s in idx.sae_ids)


def node_keys(sids, features, order: list[str]) -> np.ndarray:
    """One integer per (sae, feature) node: the SAE's position in `order` in the high bits."""
    code = pd.Categorical(np.asarray(sids, dtype=object), categories=order).codes.astype(np.int64)
    return (code << 32) | np.asarray(features, dtype=np.int64)


def _reach(links: pd.DataFrame, seeds: np.ndarray, enough: int) -> np.ndarray:
    """Hops from the seed nodes (node_keys) to each link, following links up and down (inf: not reached);
    stops once more than `enough` nodes are reached (the graph could not show more)."""
    hops = np.full(len(links), np.inf)
    up, down = links["ukey"].to_numpy(), links["dkey"].to_numpy()
    reached, h = np.unique(seeds), 0
    while True:
        touch = (np.isin(up, reached) | np.isin(down, reached)) & ~np.isfinite(hops)
        if not touch.any():
            return hops
        hops[touch] = h
        reached = np.union1d(reached, np.concatenate([up[touch], down[touch]]))
        h += 1
        if len(reached) > enough:
            return hops


def matching(texts: pd.Series, text: str) -> pd.Series:
    """Which explanations contain `text`, case-insensitively, as plain text (no regex)."""
    return texts.fillna("").astype(str).str.contains(text, case=False, regex=False)


@dataclass
class Flow:
    nodes: pd.DataFrame  # sae, feature, column (0..), explanation, density
    links: pd.DataFrame  # LINK_COLUMNS + src, dst (row numbers of nodes)
    columns: list[str]  # SAE ids in depth order
    causal: bool


def flow(idx: FeatureIndex, links: pd.DataFrame, causal: bool, explanations: dict, densities: dict,
         max_nodes: int = 60, text: str = "", start: tuple[str, int] | None = None) -> Flow:
    """The subgraph the Flow view draws. `explanations` / `densities`: {sid: per-feature array} (explanations may
    be None for an SAE without them)."""
    if start is not None:
        hops = _reach(links, node_keys([start[0]], [start[1]], idx.sae_ids), max_nodes)
    elif text.strip():
        seeds = []
        for sid in sorted(set(links["up"]) | set(links["down"])):
            expl = explanations.get(sid)
            if expl is not None:
                hit = np.nonzero(matching(pd.Series(expl), text.strip()).to_numpy())[0]
                seeds.append(node_keys([sid] * len(hit), hit, idx.sae_ids))
        hops = _reach(links, np.concatenate(seeds) if seeds else np.zeros(0, np.int64), max_nodes)
    else:
        hops = None  # every link, strongest first (all_links' order)
    if hops is None:
        ranked = links
    else:
        keep = np.isfinite(hops)
        ranked = links[keep].assign(_hop=hops[keep]).sort_values(["_hop", "weight"], ascending=[True, False],
                                                                   kind="stable").drop(columns="_hop")
    chosen, nodes = [], {}
    for row in ranked.itertuples(index=False):
        new = [n for n in ((row.up, int(row.i)), (row.down, int(row.j))) if n not in nodes]
        if len(nodes) + len(new) > max_nodes:
            break  # the strongest links (nearest first) that fit; the next one would not
        for n in new:
            nodes[n] = len(nodes)
        chosen.append(row)
    sel = pd.DataFrame(chosen, columns=[*ranked.columns])
    columns = sorted({s for s, _ in nodes}, key=lambda s: (sae_depth(idx, s), s))
    node_df = pd.DataFrame([{"sae": s, "feature": f, "column": columns.index(s),
                             "explanation": str(explanations[s][f]) if explanations.get(s) is not None else "",
                             "density": float(densities[s][f])} for (s, f) in nodes],
                           columns=["sae", "feature", "column", "explanation", "density"])
    sel["src"] = [nodes[(u, int(i))] for u, i in zip(sel["up"], sel["i"])]
    sel["dst"] = [nodes[(d, int(j))] for d, j in zip(sel["down"], sel["j"])]
    return Flow(nodes=node_df, links=sel, columns=columns, causal=causal)


def legacy_lineage(idx: FeatureIndex, sid: str, f: int, top: int = 5) -> dict[str, list[dict]]:
    """The lineage of a feature from an index without matches/ groups: a bank's correlation matches."""
    up, down = [], []
    for p in idx.sae_ids:
        if idx.info(p).get("match_next") == sid:
            best = idx.column(p, "best_next_idx")
            corr, cos = idx.column(p, "best_next_corr"), idx.column(p, "best_next_cos")
            up += [{"sae": p, "feature": int(r), "effect": float("nan"), "corr": float(corr[r]),
                    "cos": float(cos[r]), "agree": 2, "kind": "bank"} for r in np.nonzero(best == f)[0]]
    nxt = idx.info(sid).get("match_next")
    if nxt and idx.has(sid, "match_idx"):
        rec = idx.feature(sid, f)
        down = [{"sae": nxt, "feature": int(j), "effect": float("nan"), "corr": float(r), "cos": float(c),
                 "agree": 2 if int(j) == int(rec["best_next_idx"]) else 0, "kind": "bank"}
                for j, c, r in zip(rec["match_idx"], rec["match_cos"], rec["match_corr"]) if j >= 0]
    def strongest(rows):
        return sorted(rows, key=lambda e: -e["corr"])[:top]

    return {"upstream": strongest(up), "downstream": strongest(down)}


def lineage(idx: FeatureIndex, sid: str, f: int, top: int = 5) -> tuple[dict[str, list[dict]], bool]:
    """(upstream and downstream matches of feature f, whether they are causal): the index's causal matches
    when it has them, a bank's correlation matches otherwise."""
    if idx.matches():
        return idx.lineage(sid, f, top), True
    return legacy_lineage(idx, sid, f, top), False


def life_cycle(layers: list[int], mass: np.ndarray, share: float = 0.1) -> dict | None:
    """Where a multi-layer SAE's feature is born (first layer with >= `share` of its peak mass), peaks, and
    fades (last such layer); None for a feature with no mass."""
    mass = np.asarray(mass, dtype=np.float64)
    if not len(mass) or not np.isfinite(mass).all() or mass.max() <= 0:
        return None
    strong = np.nonzero(mass >= share * mass.max())[0]
    return {"born": int(layers[strong[0]]), "peak": int(layers[int(np.argmax(mass))]), "fades": int(layers[strong[-1]])}
