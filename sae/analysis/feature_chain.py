"""One feature of a per-layer bank followed through the bank's other SAEs: the same concept, layer by layer.

Each SAE of a bank is matched to the next one by `strata analyze`: the index's `matches/<j>` groups of kind
"bank" hold each feature's best match (largest causal effect, or without causal effects the highest activation
correlation; see sae/analysis/depth.py and causal.py). An index written before causal matching has only the
correlation matches (`best_next_idx`/`best_next_corr`), which are used instead. `matched_chain` reads matches only
through `next_match` and `previous_match` below. The strength reported with each link is its activation
correlation, whichever method chose it.
"""
from __future__ import annotations

import numpy as np

from sae.analysis.index_file import FeatureIndex


def _bank_match(idx: FeatureIndex, up: str | None = None, down: str | None = None) -> dict | None:
    """The bank's matches/<j> group from `up` or into `down`, or None (older index, or not in a bank)."""
    return next((m for m in idx.matches() if m["kind"] == "bank" and (m["up"] == up or m["down"] == down)), None)


def next_match(idx: FeatureIndex, sid: str, f: int) -> tuple[str, int, float] | None:
    """(next SAE, its feature matched to feature f of `sid`, activation correlation), or None at the bank's end
    or where f has no match."""
    m = _bank_match(idx, up=sid)
    if m is not None:
        a = idx.match_arrays(m["j"])
        j = int(a["best_idx"][f])
        return (m["down"], j, float(a["best_corr"][f])) if j >= 0 else None
    nxt = idx.info(sid).get("match_next")
    if not nxt or not idx.has(sid, "best_next_idx"):
        return None
    return nxt, int(idx.column(sid, "best_next_idx")[f]), float(idx.column(sid, "best_next_corr")[f])


def previous_match(idx: FeatureIndex, sid: str, f: int) -> tuple[str, int, float] | None:
    """(previous SAE, its feature whose best next match is feature f of `sid`, correlation): of several such
    features the most correlated one; None when no feature of the previous SAE points at f."""
    m = _bank_match(idx, down=sid)
    if m is not None:
        a = idx.match_arrays(m["j"])
        pointing = np.nonzero(a["best_idx"] == f)[0]
        if not len(pointing):
            return None
        corr = a["best_corr"][pointing]
        return m["up"], int(pointing[int(np.argmax(corr))]), float(corr.max())
    prev = next((s for s in idx.sae_ids if idx.info(s).get("match_next") == sid), None)
    if prev is None or not idx.has(prev, "best_next_idx"):
        return None
    pointing = np.nonzero(idx.column(prev, "best_next_idx") == f)[0]
    if not len(pointing):
        return None
    corr = idx.column(prev, "best_next_corr")[pointing]
    j = int(pointing[int(np.argmax(corr))])
    return prev, j, float(corr.max())


def matched_chain(idx: FeatureIndex, sid: str, f: int) -> list[dict]:
    """Feature f of `sid` and its matches up and down the bank, shallowest first: [{sae, feature, corr}], where
    corr is the correlation of the link to the neighbour on the side of `sid` (None for `sid` itself). An SAE
    outside a bank gives just itself."""
    up, seen = [], {sid}
    s, j = sid, f
    while (m := previous_match(idx, s, j)) is not None and m[0] not in seen:
        s, j, corr = m
        seen.add(s)
        up.append({"sae": s, "feature": j, "corr": corr})
    down = []
    s, j = sid, f
    while (m := next_match(idx, s, j)) is not None and m[0] not in seen:
        s, j, corr = m
        seen.add(s)
        down.append({"sae": s, "feature": j, "corr": corr})
    return [*reversed(up), {"sae": sid, "feature": int(f), "corr": None}, *down]
