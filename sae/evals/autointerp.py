"""Auto-interpretability: each sampled feature is explained, and the explanation scored by detection and by
fuzzing (delphi's definitions, Paulo et al. 2024), with the explainers of sae/analysis/explain.py (`tokens`
offline, an OpenAI-compatible server, a local transformers model).

Examples come from one pass over the held-out shards (at most `--autointerp-tokens` tokens) with the analysis
pass's per-feature statistics (sae/analysis/indexer.py; run once for every SAE, each multi-layer SAE once per
layer of its input): the top 20 activations with their +-5-token windows, a random sample of firings split into 5
activation-quantile intervals, and random windows with the feature's activation per centre token. The index
RUN/index/<name>.h5 is not reused: its examples may come from other shards, and an eval should not depend on
when `analyze` last ran.

Per feature (`--autointerp-features` sampled per SAE, seeded, among the features that fire at least twice):
  explanation: from the even-ranked top windows (1st, 3rd, ...) only;
  held-out activating windows: the odd-ranked top windows and the quantile samples that are not among the
    windows explained from; non-activating windows: random windows whose centre token the feature is silent on,
    as many as the activating ones;
  detection: the explainer says which windows the feature fires in; balanced accuracy (and F1) against the truth;
  fuzzing: every activating window twice, once with the tokens the feature fires on marked, once with as many
    other tokens marked at random; the explainer says which marks fit the explanation; balanced accuracy.
Per SAE and key: autointerp_detection_mean, autointerp_detection_f1_mean, autointerp_fuzzing_mean,
autointerp_features_scored; details hold a 10-bin histogram of each score over [0, 1] and each feature's
explanation and scores. An explainer that cannot be reached fails the suite (the other suites still run).
"""
from __future__ import annotations

import numpy as np
import torch

from activations.errors import StrataError
from activations.model import load_tokenizer
from activations.synth import is_synthetic
from activations.tokens import decode_each
from sae.analysis.explain import Explanation, f1, make_explainer
from sae.analysis.indexer import IndexerSettings, SaeIndexer
from sae.analysis.source import run_blocks
from sae.analysis.stream import keys_needed, slots_of
from sae.evals.suite import SuiteContext

BINS = np.linspace(0.0, 1.0, 11)


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    return 0.5 * (float(pred[truth].mean()) + float((~pred[~truth]).mean()))


def detection_score(explainer, expl: Explanation, pos_tok: np.ndarray, neg_tok: np.ndarray, vocab) -> tuple[float, float]:
    """(balanced accuracy, F1) of the explainer telling activating from non-activating windows."""
    windows = np.concatenate([pos_tok, neg_tok])
    truth = np.concatenate([np.ones(len(pos_tok), bool), np.zeros(len(neg_tok), bool)])
    pred = np.asarray(explainer.detect(expl, windows, None, vocab), bool)
    return balanced_accuracy(pred, truth), f1(pred, truth)


def fuzzing_score(explainer, expl: Explanation, pos_tok: np.ndarray, pos_act: np.ndarray, vocab,
                  rng: np.random.Generator) -> float:
    """Balanced accuracy of the explainer telling windows with the activating tokens marked from the same windows
    with as many non-activating tokens marked at random (windows with too few of those are left out); nan when
    no window is left."""
    right = (pos_act > 0) & (pos_tok >= 0)
    wrong = np.zeros_like(right)
    keep = []
    for i in range(len(pos_tok)):
        others = np.flatnonzero((pos_act[i] <= 0) & (pos_tok[i] >= 0))
        n = int(right[i].sum())
        if n == 0 or len(others) < n:
            continue
        wrong[i, rng.choice(others, n, replace=False)] = True
        keep.append(i)
    if not keep:
        return float("nan")
    keep = np.array(keep)
    windows = np.concatenate([pos_tok[keep], pos_tok[keep]])
    marks = np.concatenate([right[keep], wrong[keep]])
    truth = np.concatenate([np.ones(len(keep), bool), np.zeros(len(keep), bool)])
    return balanced_accuracy(np.asarray(explainer.fuzz(expl, windows, marks, vocab), bool), truth)


def score_feature(explainer, f: int, r: dict, vocab, rng: np.random.Generator) -> dict | None:
    """Explain feature f of a finalized SaeIndexer result and score the explanation on held-out windows."""
    top_row = np.asarray(r["top_row"][f])
    filled = top_row >= 0
    top_tok, top_act = np.asarray(r["top_tokens"][f])[filled], np.asarray(r["top_acts"][f])[filled]
    if len(top_tok) < 2:
        return None
    explained = set(zip(top_row[filled][0::2].tolist(), np.asarray(r["top_slot"][f])[filled][0::2].tolist()))
    s_row, s_slot = np.asarray(r["sample_row"][f]), np.asarray(r["sample_slot"][f])
    held = np.array([row >= 0 and (row, slot) not in explained for row, slot in zip(s_row.tolist(), s_slot.tolist())],
                    dtype=bool)
    pos_tok = np.concatenate([top_tok[1::2], np.asarray(r["sample_tokens"][f])[held]])
    pos_act = np.concatenate([top_act[1::2], np.asarray(r["sample_acts"][f])[held]])
    neg_codes = np.asarray(r["neg_codes"])
    silent = neg_codes[:, f] == 0 if len(neg_codes) else np.zeros(0, dtype=bool)
    neg_tok = np.asarray(r["neg_tokens"])[silent][:len(pos_tok)]
    if len(neg_tok) == 0:
        return None
    expl = explainer.explain(top_tok[0::2], top_act[0::2], vocab)
    detection, det_f1 = detection_score(explainer, expl, pos_tok, neg_tok, vocab)
    fuzzing = fuzzing_score(explainer, expl, pos_tok, pos_act, vocab, rng)
    return {"feature": f, "explanation": expl.text, "detection": detection, "detection_f1": det_f1,
            "fuzzing": fuzzing, "activating": int(len(pos_tok)), "non_activating": int(len(neg_tok))}


@torch.no_grad()
def gather(run, saes: dict, heldout: list[int], cfg, device) -> dict:
    """One pass over the held-out shards: {(sae_id, key or None): finalized SaeIndexer result}; a multi-layer
    SAE gets one per key of its input, any other SAE one over all its input keys."""
    settings = IndexerSettings(context=int(run.manifest.context_length), exclude_first=cfg.exclude_first)
    indexers = {}
    for sid, sae in saes.items():
        if sae.cfg.mode == "multilayer":
            for k in sae.cfg.in_keys:
                indexers[(sid, k)] = SaeIndexer(sae, [[k]], settings, device)
        else:
            indexers[(sid, None)] = SaeIndexer(sae, slots_of(sae), settings, device)
    shards = {s.index: s for s in run.manifest.shards}
    spans = [(shards[i].token_start, shards[i].token_start + shards[i].rows) for i in heldout]
    for block in run_blocks(run, keys_needed(saes), spans, cfg.batch_size, settings.window, device,
                            cfg.autointerp_tokens):
        for ix in indexers.values():
            ix.update(block)
    return {key: ix.finalize() for key, ix in indexers.items()}


def histogram(values: list[float]) -> list[int]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    return np.histogram(v, bins=BINS)[0].tolist()


def _summary(scores: list[dict]) -> dict:
    def mean(name):
        v = [s[name] for s in scores if np.isfinite(s[name])]
        return float(np.mean(v)) if v else float("nan")
    return {"autointerp_detection_mean": mean("detection"), "autointerp_detection_f1_mean": mean("detection_f1"),
            "autointerp_fuzzing_mean": mean("fuzzing"), "autointerp_features_scored": len(scores)}


def check(cfg, run) -> None:
    """Explainer flags (a transformers explainer's model is loaded only when the suite runs)."""
    if cfg.explainer != "transformers" or not cfg.explainer_model:
        make_explainer(cfg.explainer, cfg.explainer_model, cfg.explainer_url)


def run_vocab(model: dict | None) -> tuple[list[str] | None, str]:
    """(every token id of the run's model decoded, "") or (None, why the explainer sees token ids instead).
    Only the tokenizer is loaded: the explainer reads text, never the model."""
    if not (model or {}).get("id"):
        return None, "no model: token ids"
    if is_synthetic(model):
        return None, "synthetic run (strata synth): no tokenizer, token ids"
    try:
        tok = load_tokenizer(model["id"])
    except StrataError as e:
        return None, f"tokenizer not loaded ({e}); token ids"
    return decode_each(tok, range(len(tok))), ""


def run(ctx: SuiteContext) -> dict:
    cfg = ctx.cfg
    # made first: a missing flag or an explainer model that will not load fails before the pass
    explainer = make_explainer(cfg.explainer, cfg.explainer_model, cfg.explainer_url, device=cfg.device)
    results = gather(ctx.run, ctx.saes, ctx.heldout, cfg, ctx.device)
    vocab, note = run_vocab(ctx.run.manifest.model)
    saes, details = {}, {"explainer": explainer.name, "histogram_bins": BINS.tolist(), "per_feature": {},
                         "histograms": {}, "vocab_note": note}
    for sid, sae in ctx.saes.items():
        parts = {key: r for (s, key), r in results.items() if s == sid}
        fired = sum(np.asarray(r["count"]) for r in parts.values())
        alive = np.flatnonzero(fired >= 2)
        rng = np.random.default_rng(0)
        chosen = np.sort(rng.choice(alive, min(cfg.autointerp_features, len(alive)), replace=False))
        per_key, every = {}, []
        for key, r in parts.items():
            scores = [s for f in chosen.tolist() if (s := score_feature(explainer, f, r, vocab, rng)) is not None]
            every += scores
            label = key if key is not None else ",".join(sae.cfg.in_keys)
            details["per_feature"].setdefault(sid, {})[label] = scores
            if key is not None or len(sae.cfg.in_keys) == 1:
                per_key[key or sae.cfg.in_keys[0]] = _summary(scores)
        if not every:
            details["per_feature"][sid] = "no feature fired twice in the held-out tokens searched"
        overall = _summary(every)
        if len(per_key) > 1:  # a multi-layer SAE: the mean over its layers, as the other suites
            overall = {m: float(np.nanmean([v[m] for v in per_key.values()])) for m in overall}
        saes[sid] = {"overall": overall, "per_key": per_key}
        details["histograms"][sid] = {"detection": histogram([s["detection"] for s in every]),
                                      "fuzzing": histogram([s["fuzzing"] for s in every])}
    if not any(v["overall"]["autointerp_features_scored"] for v in saes.values()):
        raise StrataError("autointerp found no feature that fires at least twice in the held-out tokens searched; "
                          "raise --autointerp-tokens (0 = all held-out tokens)")
    return {"saes": saes, "details": details}
