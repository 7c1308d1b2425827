"""Feature absorption (SAEBench's first-letter task; Chanin et al., with Till's absorption fraction).

Words: single-token words of the model's own vocabulary (a leading space, then >= 2 ASCII letters), a seeded
sample of `--absorption-words`, split 80/20 into train and test words. Each word is read in context: a fixed
spelling prompt ("tiger has the first letter: T" ...) followed by the word; the activation is taken at the word's
token (the text after it cannot change it in a causal model, so the prompt stops there; the prompt is read once
and its key/value cache continued by every word). One forward pass per batch of words gives every key; one
logistic probe per key (all 26 letters, multinomial, scikit-learn) is trained on the train words' raw
activations and shared by every SAE scored at that key.

Per SAE and key, per letter L (letters whose probe F1 on the test words is >= 0.6):
  main latents: latents ranked by the class-mean difference of their activations (L vs other letters, train
    words); k-sparse logistic probes on the top k = 1, 2, ... latents; k grows while one more latent raises the
    test F1 by more than 0.03 (at most --absorption-max-k); the top k latents are L's main latents.
  per test word of letter L that the probe gets right (a "probe true positive"), with p the unit probe direction,
  a = <x, p> the activation's projection and c_i = f_i <d_i, p> each latent's contribution to it (d_i its decoder
  row in raw units), m = sum of c_i over the main latents:
    absorption fraction: 0 if m >= a or if the (at most 3) other latents with cos(d_i, p) >= 0.1 and c_i > 0 add up
      to less than 0.4 a; 1 if m <= 0; else min(their sum, a - m) / (min(their sum, a - m) + m).
    full absorption: every main latent is silent, the latent with the largest c_i has cos(d_i, p) >= 0.025, a > 0,
      and that latent's c_i >= 0.4 a.
  absorption_mean = mean over scored letters of (sum of absorption fractions / probe true positives);
  absorption_full = the same mean of (full absorptions / probe true positives); absorption_letters_scored.
Transcoders are skipped (their decoder writes another site than the probe reads), as are crosscoders.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch

from activations.errors import StrataError
from activations.tokens import decode_each
from sae.evals.model_inputs import check_model, encode_at, load_run_model, scored_inputs, token_ids
from sae.evals.suite import SuiteContext

PROMPT = "tiger has the first letter: T\nplanet has the first letter: P\nriver has the first letter: R\n"
MIN_PROBE_F1 = 0.6            # letters the probe itself cannot find are not scored
F1_JUMP = 0.03                # one more main latent must raise the k-sparse probe's F1 by more than this
FULL_COS = 0.025              # full absorption: the top contributing latent's cosine with the probe
FRACTION_COS = 0.1            # absorption fraction: each absorbing latent's cosine with the probe
PROJECTION_SHARE = 0.4        # the absorbing latents' share of the probe projection
MAX_ABSORBERS = 3             # latents that may absorb together (absorption fraction)
EPS = 1e-8


def alpha_words(vocab: list[str]) -> list[tuple[int, str]]:
    """(token id, word) of every token that is a leading space followed by two or more ASCII letters."""
    out = []
    for i, s in enumerate(vocab):
        w = s[1:]
        if s.startswith(" ") and len(w) >= 2 and w.isascii() and w.isalpha():
            out.append((i, w))
    return out


@dataclass
class LetterProbe:
    directions: dict        # letter index -> unit probe direction [d] (numpy)
    predicted_te: np.ndarray  # the probe's letter for every test word
    f1: dict                # letter index -> the probe's F1 on the test words


def letter_probe(acts_tr: np.ndarray, y_tr: np.ndarray, acts_te: np.ndarray, y_te: np.ndarray) -> LetterProbe:
    """Multinomial logistic probe for the first letter on standardised activations (which it fits in a fraction
    of the iterations raw ones need); each letter's direction in the raw space is its weights / the stds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    mean, std = acts_tr.mean(0), acts_tr.std(0) + 1e-6
    clf = LogisticRegression(max_iter=300).fit((acts_tr - mean) / std, y_tr)
    coef = (clf.coef_ if len(clf.classes_) > 2 else np.stack([-clf.coef_[0], clf.coef_[0]])) / std
    directions = {int(c): coef[i] / max(np.linalg.norm(coef[i]), 1e-12) for i, c in enumerate(clf.classes_)}
    pred = clf.predict((acts_te - mean) / std)
    f1 = {c: float(f1_score(y_te == c, pred == c, zero_division=0.0)) for c in directions}
    return LetterProbe(directions, pred, f1)


def main_latents(codes_tr: np.ndarray, pos_tr: np.ndarray, codes_te: np.ndarray, pos_te: np.ndarray,
                 max_k: int) -> list[int]:
    """The latents that carry a letter: top latents by class-mean difference, as many as keep raising the test F1
    of a k-sparse logistic probe on them by more than F1_JUMP."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    diff = codes_tr[pos_tr].mean(0) - codes_tr[~pos_tr].mean(0)
    order = [int(i) for i in np.argsort(-diff, kind="stable")[:max_k] if diff[i] > 0]
    if not order:
        return []
    mean, std = codes_tr[:, order].mean(0), codes_tr[:, order].std(0) + 1e-6
    tr, te = (codes_tr[:, order] - mean) / std, (codes_te[:, order] - mean) / std
    f1s = []
    for k in range(1, len(order) + 1):
        probe = LogisticRegression(class_weight="balanced", max_iter=300).fit(tr[:, :k], pos_tr)
        f1s.append(float(f1_score(pos_te, probe.predict(te[:, :k]), zero_division=0.0)))
        if k >= 2 and f1s[-1] - f1s[-2] <= F1_JUMP:
            return order[:k - 1]
    return order


def word_absorption(x: np.ndarray, codes: np.ndarray, main: list[int], p: np.ndarray, dec_dot_p: np.ndarray,
                    cos: np.ndarray) -> tuple[float, bool]:
    """(absorption fraction, full absorption) of one probe-true-positive word (see the module docstring)."""
    a = float(x @ p)
    contrib = codes * dec_dot_p
    m = float(contrib[main].sum()) if main else 0.0
    others = np.ones(len(codes), dtype=bool)
    others[main] = False
    others &= (cos >= FRACTION_COS) & (contrib > 0)
    absorbers = np.sort(contrib[others])[::-1][:MAX_ABSORBERS].sum()
    if a <= 0 or m >= a or absorbers < PROJECTION_SHARE * a:
        fraction = 0.0
    elif m <= 0:
        fraction = 1.0
    else:
        absorbed = min(float(absorbers), a - m)
        fraction = float(np.clip(absorbed / (absorbed + m), 0.0, 1.0))
    top = int(np.argmax(contrib))
    full = bool(a > 0 and all(codes[i] < EPS for i in main) and cos[top] >= FULL_COS
                and contrib[top] >= PROJECTION_SHARE * a)
    return fraction, full


def absorption_scores(probe: LetterProbe, acts_te: np.ndarray, y_tr: np.ndarray, y_te: np.ndarray,
                      codes_tr: np.ndarray, codes_te: np.ndarray, dirs_FD: np.ndarray, max_k: int = 10) -> dict:
    """Absorption of one SAE at one key. `dirs_FD`: each latent's decoder row in the activations' raw units."""
    norms = np.linalg.norm(dirs_FD, axis=1).clip(min=1e-12)
    per_letter = {}
    for letter, p in probe.directions.items():
        if probe.f1[letter] < MIN_PROBE_F1:
            continue
        tp = np.flatnonzero((y_te == letter) & (probe.predicted_te == letter))
        if len(tp) == 0:
            continue
        main = main_latents(codes_tr, y_tr == letter, codes_te, y_te == letter, max_k)
        dec_dot_p = dirs_FD @ p
        cos = dec_dot_p / norms
        scores = [word_absorption(acts_te[i], codes_te[i], main, p, dec_dot_p, cos) for i in tp]
        per_letter[string.ascii_lowercase[letter]] = {
            "fraction": float(np.sum([s[0] for s in scores]) / len(tp)),
            "full": float(np.sum([s[1] for s in scores]) / len(tp)),
            "probe_true_positives": int(len(tp)), "main_latents": main, "probe_f1": probe.f1[letter]}
    if not per_letter:
        return {"absorption_mean": float("nan"), "absorption_full": float("nan"), "absorption_letters_scored": 0,
                "letters": {}}
    return {"absorption_mean": float(np.mean([v["fraction"] for v in per_letter.values()])),
            "absorption_full": float(np.mean([v["full"] for v in per_letter.values()])),
            "absorption_letters_scored": len(per_letter), "letters": per_letter}


@torch.no_grad()
def word_activations(lm, keys: list[str], word_ids: list[int], device, batch: int = 256) -> dict:
    """{key: [words, d]} at each word's token after the spelling prompt. The prompt is the same for every word:
    the model reads it once, and each batch of words continues a copy of its key/value cache (one token per
    word instead of the whole prompt)."""
    import copy

    from activations.hooks import capture

    prefix = torch.tensor([token_ids(lm.tokenizer, PROMPT, 1 << 20)], device=device)
    out = lm.model(input_ids=prefix, use_cache=True)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    acts_by_key = {k: [] for k in keys}
    for s in range(0, len(word_ids), batch):
        ids = torch.tensor(word_ids[s:s + batch], device=device).unsqueeze(1)
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(len(ids))
        acts = capture(lm.model, keys, ids, past_key_values=past)
        for k in keys:
            acts_by_key[k].append(acts[k][:, -1].float().cpu())
    return {k: torch.cat(v).numpy() for k, v in acts_by_key.items()}


def check(cfg, run) -> None:
    check_model(run, "absorption")


@torch.no_grad()
def run(ctx: SuiteContext) -> dict:
    cfg = ctx.cfg
    keys_of, skipped = scored_inputs(ctx.saes, "absorption")
    for sid in [s for s in keys_of if ctx.saes[s].cfg.mode == "transcoder"]:
        del keys_of[sid]
        skipped[sid] = "a transcoder's decoder writes another site than the probe reads"
    if not keys_of:
        raise StrataError("absorption has no SAE to score here (it scores per-layer and multi-layer SAEs; "
                          + "; ".join(f"{s}: {why}" for s, why in skipped.items()) + ")")
    lm = load_run_model(ctx.run, ctx.device, ctx.dtype, "absorption")
    vocab = decode_each(lm.tokenizer, range(len(lm.tokenizer)))
    words = alpha_words(vocab)
    rng = np.random.default_rng(0)  # the same words on every eval
    words = [words[i] for i in rng.permutation(len(words))[:cfg.absorption_words]]
    if len(words) < 50:
        raise StrataError(f"the model's vocabulary has {len(words)} single-token words (a leading space and "
                          f">= 2 letters), too few for the first-letter task (50 needed); skip --suite absorption")
    y = np.array([string.ascii_lowercase.index(w[0].lower()) for _, w in words])
    n_tr = int(0.8 * len(words))
    keys = sorted({k for ks in keys_of.values() for k in ks})
    acts = word_activations(lm, keys, [i for i, _ in words], ctx.device)
    probes = {k: letter_probe(acts[k][:n_tr], y[:n_tr], acts[k][n_tr:], y[n_tr:]) for k in keys}
    saes, letters = {}, {}
    for sid, ks in keys_of.items():
        sae = ctx.saes[sid]
        per_key = {}
        for k in ks:
            x = torch.from_numpy(acts[k])
            codes = encode_at(sae, x, k).cpu().numpy()
            dirs = (sae.W_dec.detach().float() / sae.out_scale(k)).cpu().numpy()
            r = absorption_scores(probes[k], acts[k][n_tr:], y[:n_tr], y[n_tr:], codes[:n_tr], codes[n_tr:], dirs,
                                  cfg.absorption_max_k)
            letters.setdefault(sid, {})[k] = r.pop("letters")
            per_key[k] = r
        overall = {m: float(np.nanmean([v[m] for v in per_key.values()])) if any(
            np.isfinite(v[m]) for v in per_key.values()) else float("nan")
            for m in ("absorption_mean", "absorption_full")}
        overall["absorption_letters_scored"] = float(np.mean([v["absorption_letters_scored"] for v in per_key.values()]))
        saes[sid] = {"overall": overall, "per_key": per_key}
    details = {"words": len(words), "train_words": n_tr, "prompt": PROMPT,
               "probe_mean_f1": {k: float(np.mean(list(p.f1.values()))) for k, p in probes.items()},
               "per_letter": letters, "skipped": skipped}
    return {"saes": saes, "details": details}
