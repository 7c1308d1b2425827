"""Which features to show first: the order of the Features page's default sort and of `strata share`'s default
selection (`best:N`).

Two kinds of feature say little however they are explained, and are set aside (shown behind a toggle):
  always-on      density above ALWAYS_ON_DENSITY: fires on a large share of all tokens (a bias direction, or
                 position or "any text"), so its top contexts are not what it detects.
  outlier-only   max activation at least OUTLIER_RATIO times its mean activation when firing. In a normal feature
                 the two are within a few times of each other (on the demo index at most 7x); the exceptions peak on
                 the few massive-activation tokens of the residual stream (the attention sink, the first '\\n' of a
                 text: residual norms ~100x the rest), so their top contexts are those tokens and say nothing of
                 what they do elsewhere.
The rest are ranked by explanation score (detection F1 of their explanation on held-out contexts, the index's
`explanation_score`), best first; ties go to densities inside USEFUL_DENSITY (neither near-dead nor dense),
then to the lower feature index. Without explanations the density band alone orders them. Two kinds come after
all the others, in that same order, because a first screen full of them teaches nothing:
  formatting     at least half of its top contexts peak on a token of whitespace, punctuation or symbols only
                 ('\n', ' |', '.'): a trivial token detector scores a high F1 but is rarely what one looks for
  repeat         its explanation is word for word that of a feature ranked above it
"""
from __future__ import annotations

import unicodedata

import numpy as np

ALWAYS_ON_DENSITY = 0.3
OUTLIER_RATIO = 10.0
USEFUL_DENSITY = (1e-3, 5e-2)

FLAG_HELP = {
    "always-on": f"density above {ALWAYS_ON_DENSITY:.0%}: fires on so many tokens that its top contexts are not "
                 "what it detects",
    "outlier-only": f"max activation at least {OUTLIER_RATIO:g}x its mean: it peaks on the few massive-activation "
                    "tokens (the attention sink, the first newline), so its top contexts are those tokens",
}


def feature_flags(frequency: np.ndarray, mean_act: np.ndarray, max_act: np.ndarray) -> np.ndarray:
    """Per feature: "always-on", "outlier-only" or "" (object array)."""
    frequency, mean_act, max_act = (np.asarray(a, dtype=np.float64) for a in (frequency, mean_act, max_act))
    flags = np.full(len(frequency), "", dtype=object)
    with np.errstate(divide="ignore", invalid="ignore"):
        outlier = (mean_act > 0) & (max_act >= OUTLIER_RATIO * mean_act)
    flags[outlier] = "outlier-only"
    flags[frequency > ALWAYS_ON_DENSITY] = "always-on"
    return flags


def band_distance(frequency: np.ndarray) -> np.ndarray:
    """How far (in decades) each density lies outside USEFUL_DENSITY; 0 inside, inf for a feature that never fires."""
    lo, hi = np.log10(USEFUL_DENSITY[0]), np.log10(USEFUL_DENSITY[1])
    with np.errstate(divide="ignore"):
        logf = np.log10(np.asarray(frequency, dtype=np.float64))
    return np.where(np.isfinite(logf), np.maximum(lo - logf, 0) + np.maximum(logf - hi, 0), np.inf)


def blank_token(s: str) -> bool:
    """A token made of whitespace, punctuation or symbol characters only (or empty)."""
    return all(c.isspace() or unicodedata.category(c)[0] in "PS" for c in s)


def formatting_features(top_tokens: np.ndarray, top_value: np.ndarray, vocab: list[str] | None) \
        -> np.ndarray | None:
    """Per feature: whether at least half of its top contexts peak on a blank token (None without a vocabulary).
    `top_tokens` [n, k, window] are the index's top contexts, each centred on its peak, `top_value` [n, k] the
    activation there (a context with value 0 or token -1 is not one: the feature fired fewer than k times)."""
    if vocab is None:
        return None
    top_tokens = np.asarray(top_tokens)
    peaks = top_tokens[:, :, top_tokens.shape[2] // 2]
    blank = np.array([blank_token(s) for s in vocab] + [False])  # index len(vocab): no context
    valid = (peaks >= 0) & (peaks < len(vocab)) & (np.asarray(top_value) > 0)
    n_blank = blank[np.where(valid, peaks, len(vocab))].sum(1)
    return valid.any(1) & (2 * n_blank >= valid.sum(1))


def interpretable_order(score: np.ndarray | None, frequency: np.ndarray, explanation: np.ndarray | None = None,
                        formatting: np.ndarray | None = None) -> np.ndarray:
    """Every feature index, best first: explanation score descending (missing scores last), then distance from the
    useful density band, then feature index; formatting features and repeats of a higher explanation after all
    the others, in the same order."""
    n = len(frequency)
    s = np.zeros(n) if score is None else np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf)
    order = np.lexsort((np.arange(n), band_distance(frequency), -s))
    later = np.zeros(n, dtype=bool) if formatting is None else np.asarray(formatting, dtype=bool).copy()
    if explanation is not None:
        seen: set[str] = set()
        for f in order[~later[order]]:
            text = str(explanation[f])
            later[f] = text in seen
            seen.add(text)
    return order[np.argsort(later[order], kind="stable")]


def ranked_features(score: np.ndarray | None, frequency, mean_act, max_act, explanation=None,
                    formatting=None) -> tuple[np.ndarray, dict[str, int]]:
    """(the features that are neither always-on nor outlier-only, best first; {flag: how many were set aside})."""
    flags = feature_flags(frequency, mean_act, max_act)
    order = interpretable_order(score, frequency, explanation, formatting)
    kept = order[flags[order] == ""]
    return kept, {flag: int((flags == flag).sum()) for flag in FLAG_HELP}
