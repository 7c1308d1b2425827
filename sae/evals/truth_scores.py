"""Scores of a dictionary and of cross-layer links against known features (pure numpy; the truth suite and the
feature-flow tests use them on runs written by `strata synth`).

A true feature counts as *recovered* when some latent's decoder direction has cosine >= RECOVERED_COS (0.9) with
it; a latent is *correct* when its decoder has cosine >= 0.9 with some true feature. Latents are mapped to the
true feature of highest cosine when that cosine reaches 0.9, else to -1 (unmapped).
"""
from __future__ import annotations

import numpy as np

RECOVERED_COS = 0.9


def unit_rows(W: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; all-zero rows stay zero (their cosine with anything is 0)."""
    W = np.asarray(W, dtype=np.float64)
    n = np.linalg.norm(W, axis=1, keepdims=True)
    return np.divide(W, n, out=np.zeros_like(W), where=n > 1e-12)


def cosines(W_dec: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[n_latents, n_true] cosine of every decoder row with every true direction."""
    return unit_rows(W_dec) @ unit_rows(truth).T


def dictionary_scores(cos_LT: np.ndarray, counted: np.ndarray | None = None) -> dict:
    """MMCS (mean over true features of their best cosine with any latent), recall (fraction of true features
    recovered), precision (fraction of the `counted` latents, default all, that are correct) and their F1."""
    n_lat, n_true = cos_LT.shape
    if n_true == 0:
        return {}
    counted = np.ones(n_lat, dtype=bool) if counted is None else np.asarray(counted, dtype=bool)
    best_T = cos_LT.max(0) if n_lat else np.zeros(n_true)
    recall = float((best_T >= RECOVERED_COS).mean())
    precision = float((cos_LT[counted].max(1) >= RECOVERED_COS).mean()) if counted.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"mmcs": float(best_T.mean()), "recall": recall, "precision": precision, "f1": f1,
            "n_true": int(n_true), "n_counted": int(counted.sum())}


def latent_map(cos_LT: np.ndarray, true_ids: np.ndarray) -> np.ndarray:
    """[n_latents] the true feature id each latent represents (best cosine >= 0.9), else -1."""
    if cos_LT.shape[1] == 0:
        return np.full(cos_LT.shape[0], -1, dtype=np.int64)
    best = cos_LT.argmax(1)
    return np.where(cos_LT.max(1) >= RECOVERED_COS, np.asarray(true_ids)[best], -1).astype(np.int64)


def related_pairs(lineage, layer_a: int, layer_b: int) -> set[tuple[int, int]]:
    """(feature at layer_a, feature at layer_b) pairs joined by the lineage: the identity for the same layer, the
    edges of the transition for adjacent layers, and chains of edges further apart."""
    if layer_b < layer_a:
        return {(b, a) for a, b in related_pairs(lineage, layer_b, layer_a)}
    pairs = {(int(f), int(f)) for f in lineage.live_ids(layer_a)}
    for L in range(layer_a + 1, layer_b + 1):
        step: dict[int, set[int]] = {}
        for p, c in lineage.links(L):
            step.setdefault(p, set()).add(c)
        pairs = {(a, c) for a, b in pairs for c in step.get(b, ())}
    return pairs


def score_links(pred_up: np.ndarray, up_map: np.ndarray, down_map: np.ndarray, true_pairs: set) -> dict:
    """Links upstream latent i -> downstream latent pred_up[i] (-1 = none) against the true lineage.

    Only links whose two ends are mapped to true features are judged: precision = the fraction of those joining
    features related in the lineage; recall = the fraction of true pairs (both features represented by some
    latent) that some link joins."""
    pred_up = np.asarray(pred_up)
    linked = set()
    judged = correct = 0
    for i, j in enumerate(pred_up):
        if j < 0 or j >= len(down_map) or up_map[i] < 0 or down_map[j] < 0:
            continue
        pair = (int(up_map[i]), int(down_map[j]))
        judged += 1
        correct += pair in true_pairs
        linked.add(pair)
    have_up, have_down = set(up_map[up_map >= 0].tolist()), set(down_map[down_map >= 0].tolist())
    reachable = {p for p in true_pairs if p[0] in have_up and p[1] in have_down}
    precision = correct / judged if judged else 0.0
    recall = len(reachable & linked) / len(reachable) if reachable else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "links": judged, "true_links": len(reachable)}


def profile_iou(observed_LK: np.ndarray, true_LK: np.ndarray) -> float:
    """Mean over latents with a non-empty true profile of the Jaccard index of their observed and true sets of
    keys (boolean [n_latents, n_keys] each); NaN when no latent has a true profile."""
    rows = true_LK.any(1)
    if not rows.any():
        return float("nan")
    inter = (observed_LK[rows] & true_LK[rows]).sum(1)
    union = (observed_LK[rows] | true_LK[rows]).sum(1)
    return float((inter / union).mean())
