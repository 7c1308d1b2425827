"""One feature of a per-layer bank followed through the bank's other SAEs: the same concept, layer by layer.

Each SAE of a bank is matched to the next one by `strata analyze` (decoder-cosine candidates ranked by activation
correlation, the index's `best_next_idx`/`best_next_corr`; see sae/analysis/depth.py). `matched_chain` reads
those matches only through `next_match` and `previous_match` below, so a better matcher needs only those two
changed.
"""
from __future__ import annotations

import numpy as np

from sae.analysis.index_file import FeatureIndex


def next_match(idx: FeatureIndex, sid: str, f: int) -> tuple[str, int, float] | None:
    """(next SAE, its feature matched to feature f of `sid`, activation correlation), or None at the bank's end."""
    nxt = idx.info(sid).get("match_next")
    if not nxt or not idx.has(sid, "best_next_idx"):
        return None
    return nxt, int(idx.column(sid, "best_next_idx")[f]), float(idx.column(sid, "best_next_corr")[f])


def previous_match(idx: FeatureIndex, sid: str, f: int) -> tuple[str, int, float] | None:
    """(previous SAE, its feature whose best next match is feature f of `sid`, correlation): of several such
    features the most correlated one; None when no feature of the previous SAE points at f."""
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
