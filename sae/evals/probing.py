"""Sparse probing (SAEBench): how well a handful of latents carry a labelled property, against a probe on the
raw activations.

Texts: the built-in tasks of probe_tasks.py, or a user's `--probe-tasks FILE.jsonl`; each cut to `--probe-tokens`
tokens (BOS first, as the harvest does). One forward pass per batch of texts gives every key the SAEs need.
Pooling: the mean over a text's tokens (those the SAEs were trained on: the first `exclude_first` positions are
left out), of the raw activations for the baseline probe and of each SAE's latents (encoded per token, then
averaged) for the sparse probes.

Each task is split 80/20 (stratified, seeded) into train and test texts. A two-class task is one binary task; a
task with more classes gives one binary task per class (that class vs the rest, the rest subsampled to as many
examples as the class, in train and test alike). Per binary task: the k latents with the largest |mean over the
positive texts - mean over the negatives| on the train texts, a logistic regression on them (standardised), and
its test accuracy, for k = 1, 2, 5, 20; and the same probe on every dimension of the raw pooled activations.

Per SAE and key (a multi-layer SAE: each key of its input): probing_k1_accuracy, probing_k2_accuracy,
probing_k5_accuracy, probing_k20_accuracy and probing_full_accuracy (the raw-activation probe at that key), each
averaged over the binary tasks of a task and then over tasks; per task in details.
"""
from __future__ import annotations

import numpy as np
import torch

from activations.errors import StrataError
from sae.evals.model_inputs import check_model, encode_at, forward_batches, load_run_model, scored_inputs, token_ids
from sae.evals.probe_tasks import builtin_tasks, read_task_file
from sae.evals.suite import SuiteContext

KS = (1, 2, 5, 20)


def _probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def probe_accuracy(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> float:
    """Test accuracy of a logistic probe on every column."""
    return float((_probe().fit(x_tr, y_tr).predict(x_te) == y_te).mean())


def top_latents(codes_tr: np.ndarray, y_tr: np.ndarray, k: int) -> list[int]:
    """The k latents with the largest |class-mean difference| on the train examples."""
    diff = np.abs(codes_tr[y_tr].mean(0) - codes_tr[~y_tr].mean(0))
    return [int(i) for i in np.argsort(-diff, kind="stable")[:k]]


def sparse_probe_accuracy(codes_tr, y_tr, codes_te, y_te, k: int) -> tuple[float, list[int]]:
    """(test accuracy, latents) of a logistic probe on the top k latents by mean difference."""
    cols = top_latents(codes_tr, y_tr, k)
    return probe_accuracy(codes_tr[:, cols], y_tr, codes_te[:, cols], y_te), cols


def binary_tasks(labels: np.ndarray, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, train rows, test rows, positive mask over all rows) of each binary task of a labelled task."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    tr, te = train_test_split(rows, test_size=0.2, random_state=seed, stratify=labels)
    classes = sorted(set(labels.tolist()))
    if len(classes) == 2:
        return [(f"{classes[1]} vs {classes[0]}", tr, te, labels == classes[1])]
    rng = np.random.default_rng(seed)
    out = []
    for c in classes:
        pos = labels == c

        out.append((f"{c} vs rest", _balanced(tr, pos, rng), _balanced(te, pos, rng), pos))
    return out


def _balanced(part: np.ndarray, pos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The positive rows of `part` and as many of its negative rows, drawn at random."""
    p, n = part[pos[part]], part[~pos[part]]
    return np.sort(np.concatenate([p, rng.permutation(n)[:len(p)]]))


def pooled_activations(lm, keys_of: dict, saes: dict, texts: list[str], max_tokens: int, first: int, device,
                       batch: int = 16) -> tuple[dict, dict]:
    """({key: raw pooled [N, d]}, {(sae_id, key): pooled latents [N, F]}) of every text."""
    seqs = [token_ids(lm.tokenizer, t, max_tokens) for t in texts]
    short = [i for i, q in enumerate(seqs) if len(q) <= first]
    if short:
        raise StrataError(f"probing text {short[0] + 1} has {len(seqs[short[0]])} tokens, none after the first "
                          f"{first} the SAEs were not trained on; give longer texts")
    keys = sorted({k for ks in keys_of.values() for k in ks})
    raw = {k: [] for k in keys}
    lat = {(sid, k): [] for sid, ks in keys_of.items() for k in ks}
    for _, acts, mask in forward_batches(lm, keys, seqs, batch, device):
        mask = mask.clone()
        mask[:, :first] = False
        B, T = mask.shape
        text_of = torch.arange(B, device=mask.device).unsqueeze(1).expand(B, T)[mask]
        count = mask.sum(1, keepdim=True).float()
        for k in keys:
            x = acts[k][mask]
            raw[k].append((torch.zeros(B, x.shape[1], device=x.device).index_add_(0, text_of, x) / count).cpu())
            for sid, ks in keys_of.items():
                if k in ks:
                    f = encode_at(saes[sid], x, k)
                    pooled = torch.zeros(B, f.shape[1], device=f.device).index_add_(0, text_of, f) / count
                    lat[(sid, k)].append(pooled.cpu())
    return ({k: torch.cat(v).numpy() for k, v in raw.items()},
            {sk: torch.cat(v).numpy() for sk, v in lat.items()})


def check(cfg, run) -> None:
    check_model(run, "probing")
    if cfg.probe_tasks:
        read_task_file(cfg.probe_tasks)


@torch.no_grad()
def run(ctx: SuiteContext) -> dict:
    cfg = ctx.cfg
    tasks = read_task_file(cfg.probe_tasks) if cfg.probe_tasks else builtin_tasks(cfg.probe_examples)
    keys_of, skipped = scored_inputs(ctx.saes, "probing")
    if not keys_of:
        raise StrataError("probing has no SAE to score here (" + "; ".join(f"{s}: {w}" for s, w in skipped.items())
                          + ")")
    lm = load_run_model(ctx.run, ctx.device, ctx.dtype, "probing")
    texts = [t for ts, _ in tasks.values() for t in ts]
    raw, lat = pooled_activations(lm, keys_of, ctx.saes, texts, cfg.probe_tokens, cfg.exclude_first, ctx.device)
    per_task: dict = {}
    start = 0
    for name, (ts, labels) in tasks.items():
        rows = slice(start, start + len(ts))
        start += len(ts)
        subtasks = binary_tasks(np.array(labels))
        full = {}
        for k, x in raw.items():
            x = x[rows]
            full[k] = float(np.mean([probe_accuracy(x[tr], pos[tr], x[te], pos[te]) for _, tr, te, pos in subtasks]))
        for (sid, k), codes in lat.items():
            codes = codes[rows]
            m = {}
            for kk in KS:
                m[f"probing_k{kk}_accuracy"] = float(np.mean([
                    sparse_probe_accuracy(codes[tr], pos[tr], codes[te], pos[te], kk)[0]
                    for _, tr, te, pos in subtasks]))
            m["probing_full_accuracy"] = full[k]
            per_task.setdefault(sid, {}).setdefault(k, {})[name] = m
    saes = {}
    for sid, by_key in per_task.items():
        per_key = {k: {m: float(np.mean([t[m] for t in ts.values()])) for m in next(iter(ts.values()))}
                   for k, ts in by_key.items()}
        overall = {m: float(np.mean([v[m] for v in per_key.values()])) for m in next(iter(per_key.values()))}
        saes[sid] = {"overall": overall, "per_key": per_key}
    details = {"tasks": {n: {"examples": len(ts), "classes": sorted(set(ls))} for n, (ts, ls) in tasks.items()},
               "source": cfg.probe_tasks or "built-in", "tokens_per_text": cfg.probe_tokens, "pooling": "mean",
               "per_task": per_task, "skipped": skipped}
    return {"saes": saes, "details": details}
