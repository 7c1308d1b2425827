"""Explanations written into an index after its statistics, so an explainer failure loses no finished work.

`strata analyze` writes RUN/index/<name>.h5 with every statistic and the offline token explanations first.
A slow or remote explainer (openai, transformers) then explains feature after feature; its explanations are
swapped into the index (index_file.update_explanations) every few minutes, at the end, and when it stops with
an error, recording per SAE how many features it has explained. `strata analyze RUN --name N --explain-only`
reads everything it needs back from the index and continues from the first feature not yet explained.
"""
from __future__ import annotations

import time

import numpy as np

from sae.analysis.explain import explain_feature
from sae.analysis.index_file import FeatureIndex, update_explanations

FALLBACK = "tokens"  # the explainer whose explanations an index holds before a slower one has finished
SAVE_EVERY_S = 300.0  # how often explanations in progress are swapped into the index


def explain_limit(n_latents: int, explain_max: int) -> int:
    """How many of an SAE's features are explained (the first ones)."""
    return min(n_latents, explain_max) if explain_max else n_latents


def explain_in_memory(explainer, results: dict, limits: dict, vocab) -> None:
    """Add explanation / explanation_score to every SAE's pass results `results[sid]` (before the index is written)."""
    for sid, r in results.items():
        n = len(r["count"])
        texts, scores = [""] * n, np.full(n, np.nan, dtype=np.float32)
        for f in range(limits[sid]):
            texts[f], scores[f] = explain_feature(explainer, f, r, vocab)
        r["explanation"], r["explanation_score"] = texts, scores


def explain_into_index(path, explainer, inputs: dict, limits: dict, vocab, current: dict, start: dict) -> int:
    """Explain features start[sid] .. limits[sid]-1 of every SAE with `explainer` into `current[sid]` (texts,
    scores), saving progress into the index at `path`; returns the number of features explained. On any error
    the finished explanations are saved first, then the error propagates."""
    done = dict(start)
    total = sum(limits.values())
    touched: set = set()
    last_save = time.monotonic()

    def save():
        finished = all(done[sid] >= limits[sid] for sid in limits)
        label = explainer.name if finished else \
            f"{explainer.name} ({sum(done.values())} of {total} features; the others {FALLBACK})"
        update_explanations(path, {sid: (*current[sid], done[sid]) for sid in touched}, explainer.name, label)

    try:
        for sid, r in inputs.items():
            texts, scores = current[sid]
            for f in range(done[sid], limits[sid]):
                texts[f], scores[f] = explain_feature(explainer, f, r, vocab)
                done[sid] = f + 1
                touched.add(sid)
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    save()
                    last_save = time.monotonic()
    except BaseException:
        if touched:
            save()
        raise
    touched.update(limits)  # a finished run relabels every SAE, also those an earlier run had finished
    save()
    return sum(done.values()) - sum(start.values())


def read_back(idx: FeatureIndex, explainer_name: str, explain_max: int) -> tuple[dict, dict, dict, dict]:
    """(inputs, limits, current, start) of `explain_into_index` for every SAE of an open index: the examples
    and negatives explain_feature reads, the explanations the index holds, and where `explainer_name` stopped."""
    inputs, limits, current, start = {}, {}, {}, {}
    for sid in idx.sae_ids:
        n = idx.n_latents(sid)
        top = idx.column(sid, "top_tokens")
        neg = idx.negatives(sid)
        inputs[sid] = {name: idx.column(sid, name) for name in ("top_tokens", "top_acts", "top_row", "sample_row",
                                                                  "sample_tokens")}
        inputs[sid]["neg_tokens"] = neg[0] if neg is not None else np.zeros((0, top.shape[2]), dtype=np.int32)
        inputs[sid]["neg_codes"] = neg[1] if neg is not None else np.zeros((0, n), dtype=np.float16)
        limits[sid] = explain_limit(n, explain_max)
        texts = idx.column(sid, "explanation")
        scores = idx.column(sid, "explanation_score")
        current[sid] = (list(texts) if texts is not None else [""] * n,
                        scores.astype(np.float32) if scores is not None else np.full(n, np.nan, dtype=np.float32))
        explained = idx.explained(sid)
        start[sid] = min(limits[sid], explained.get("features", 0)) if explained.get("explainer") == explainer_name else 0
    return inputs, limits, current, start
