"""Explanations of features, pluggable, each scored the same way: detection F1.

An explainer turns a feature's top activating contexts into a short text, and given that text says which
of a set of contexts it expects the feature to fire in. Scoring (the auto-interp "detection" test): held-out
activating contexts (the odd-ranked top examples and the quantile-interval samples) against contexts where
the feature is silent at the centre token; F1 of the explainer's yes/no answers. Deterministic for the
default explainer. Each explainer also judges fuzzing (`fuzz`: are the marked tokens of an excerpt the ones the
explanation describes?), which `strata eval --suite autointerp` scores beside detection.

  tokens        offline default: the tokens the feature peaks on, weighted by activation (no network)
  openai        any OpenAI-compatible /chat/completions endpoint (e.g. a local llama.cpp or vLLM server), through
                the `openai` client: rate limits (429), server errors and dropped connections are retried with
                exponential backoff (honouring Retry-After) before an ExplainerError
  transformers  a local causal LM loaded through activations.model (greedy generation, yes/no by logits)
"""
from __future__ import annotations

import abc
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from activations.errors import StrataError


@dataclass
class Explanation:
    text: str
    tokens: set = field(default_factory=set)  # token ids (tokens explainer only)


def window_text(tokens: np.ndarray, vocab, acts: np.ndarray | None = None, mark: bool = False) -> str:
    """Plain text of a window (-1 = outside the document); with mark, the peak token is wrapped in << >>."""
    peak = int(np.argmax(acts)) if acts is not None and mark else -1
    parts = []
    for i, t in enumerate(tokens):
        if t < 0:
            continue
        s = vocab[t] if vocab is not None and t < len(vocab) else f"<{t}>"
        parts.append(f"<<{s}>>" if i == peak else s)
    return "".join(parts)


class TokenExplainer:
    name = "tokens"

    def __init__(self, coverage: float = 0.8, max_tokens: int = 5):
        self.coverage, self.max_tokens = coverage, max_tokens

    def explain(self, windows: np.ndarray, acts: np.ndarray, vocab) -> Explanation:
        weight: Counter = Counter()
        for tok, a in zip(windows, acts):
            if (tok >= 0).any() and a.max() > 0:
                peak = int(np.argmax(a))
                weight[int(tok[peak])] += float(a[peak])
        if not weight:
            return Explanation("(never fires)")
        total = sum(weight.values())
        chosen, covered = [], 0.0
        for t, w in sorted(weight.items(), key=lambda kv: (-kv[1], kv[0])):
            chosen.append((t, w))
            covered += w
            if covered >= self.coverage * total or len(chosen) >= self.max_tokens:
                break
        def name(t):
            return repr(vocab[t]) if vocab is not None and t < len(vocab) else f"<{t}>"
        text = "fires on " + ", ".join(f"{name(t)} ({100 * w / total:.0f}%)" for t, w in chosen)
        return Explanation(text, {t for t, _ in chosen})

    def detect(self, expl: Explanation, windows: np.ndarray, acts_unused, vocab) -> np.ndarray:
        if not expl.tokens:
            return np.zeros(len(windows), dtype=bool)
        return np.isin(windows, list(expl.tokens)).any(1)

    def fuzz(self, expl: Explanation, windows: np.ndarray, marks: np.ndarray, vocab) -> np.ndarray:
        """Per window: do the marked tokens fit the explanation (is one of them a token it names)?"""
        if not expl.tokens:
            return np.zeros(len(windows), dtype=bool)
        return (np.isin(windows, list(expl.tokens)) & marks).any(1)


def _explain_prompt(windows, acts, vocab) -> str:
    lines = [window_text(t, vocab, a, mark=True) for t, a in zip(windows, acts) if (t >= 0).any()]
    return ("Below are text excerpts where one feature of a neural network fires most strongly; the token where it "
            "fires is marked <<like this>>. In one short phrase, say what the feature detects.\n\n"
            + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(lines)) + "\n\nThe feature detects:")


def _detect_prompt(text: str, windows, vocab) -> str:
    lines = [window_text(t, vocab) for t in windows]
    return (f"A feature of a neural network detects: {text}\nFor each numbered excerpt, decide whether the feature "
            "fires somewhere in it. Answer with the numbers of the excerpts where it fires, comma separated, or "
            "'none'.\n\n" + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(lines)) + "\n\nExcerpts where it fires:")


def _fuzz_prompt(text: str, windows, marks, vocab) -> str:
    lines = []
    for t, m in zip(windows, marks):
        parts = [(f"<<{vocab[x]}>>" if mk else vocab[x]) if vocab is not None and x < len(vocab) else
                 (f"<<<{x}>>>" if mk else f"<{x}>") for x, mk in zip(t, m) if x >= 0]
        lines.append("".join(parts))
    return (f"A feature of a neural network detects: {text}\nIn each numbered excerpt some tokens are marked "
            "<<like this>>. Decide for each excerpt whether the marked tokens are ones the feature would fire on. "
            "Answer with the numbers of the excerpts whose marks are right, comma separated, or 'none'.\n\n"
            + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(lines)) + "\n\nExcerpts with the right marks:")


def _parse_numbers(answer: str, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    for m in re.findall(r"\d+", answer):
        i = int(m) - 1
        if 0 <= i < n:
            out[i] = True
    return out


class ExplainerError(StrataError):
    """The explainer gave up (e.g. its endpoint still failed after every retry): explanations are incomplete."""


class PromptExplainer(abc.ABC):
    """An explainer that asks a language model: explain, detect and fuzz are one prompt each, answered by the
    subclass's `complete(prompt) -> text`."""

    @abc.abstractmethod
    def complete(self, prompt: str) -> str:
        """The model's answer to one prompt."""

    def explain(self, windows, acts, vocab) -> Explanation:
        text = self.complete(_explain_prompt(windows, acts, vocab))
        return Explanation((text.splitlines() or [""])[0][:200] or "(no explanation)")

    def detect(self, expl, windows, acts_unused, vocab) -> np.ndarray:
        return _parse_numbers(self.complete(_detect_prompt(expl.text, windows, vocab)), len(windows))

    def fuzz(self, expl, windows, marks, vocab) -> np.ndarray:
        return _parse_numbers(self.complete(_fuzz_prompt(expl.text, windows, marks, vocab)), len(windows))


class OpenAIExplainer(PromptExplainer):
    """Chat completions on an OpenAI-compatible server; the key (if any) is read from an environment variable."""

    name = "openai"

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 6):
        import openai

        if not url:
            raise StrataError("the openai explainer needs --explainer-url (e.g. http://localhost:8080/v1)")
        self.url, self.model, self.max_retries = url.rstrip("/"), model, max_retries
        # local servers need no key; the client insists on one, and sends it only as a bearer token
        self.client = openai.OpenAI(base_url=self.url, api_key=os.environ.get(api_key_env) or "none",
                                    timeout=timeout, max_retries=max_retries)

    def complete(self, prompt: str) -> str:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model, temperature=0, max_tokens=64, messages=[{"role": "user", "content": prompt}])
            return str(reply.choices[0].message.content or "").strip()
        except openai.OpenAIError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ExplainerError(f"explainer endpoint {self.url} failed after {self.max_retries} retries "
                                 f"({type(e).__name__}: {first})") from None
        except (IndexError, AttributeError, TypeError):  # a reply without choices / message
            raise ExplainerError(f"explainer endpoint {self.url} sent a reply that is not a chat completion; "
                                 f"check --explainer-url") from None


class TransformersExplainer(PromptExplainer):
    """A local causal LM (any id activations.model.load_model accepts)."""

    name = "transformers"

    def __init__(self, model_id: str, device="auto", max_new_tokens: int = 24):
        from activations.model import load_model

        self.lm = load_model(model_id, device=device)
        self.max_new_tokens = max_new_tokens

    def complete(self, prompt: str) -> str:
        import torch

        tok = self.lm.tokenizer
        ids = tok(prompt, return_tensors="pt").input_ids.to(next(self.lm.model.parameters()).device)
        with torch.no_grad():
            out = self.lm.model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def make_explainer(kind: str, model: str = "", url: str = "", api_key_env: str = "OPENAI_API_KEY", device="auto"):
    if kind == "tokens":
        return TokenExplainer()
    if kind == "openai":
        return OpenAIExplainer(url, model, api_key_env)
    if kind == "transformers":
        if not model:
            raise StrataError("the transformers explainer needs --explainer-model (a model id or folder)")
        return TransformersExplainer(model, device)
    raise StrataError(f"unknown explainer {kind!r}; use tokens, openai, transformers or none")


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float((pred & truth).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / pred.sum(), tp / truth.sum()
    return 2 * precision * recall / (precision + recall)


def explain_feature(explainer, f: int, r: dict, vocab, max_negatives: int = 20) -> tuple[str, float]:
    """Explain feature f of an indexer result `r` (torch tensors from the pass, or numpy arrays read back from
    an index) from its even-ranked top examples; score on held-out ones."""
    top_tok, top_act = np.asarray(r["top_tokens"][f]), np.asarray(r["top_acts"][f])
    filled = np.asarray(r["top_row"][f]) >= 0
    top_tok, top_act = top_tok[filled], top_act[filled]
    if len(top_tok) == 0:
        return "(never fires)", float("nan")
    expl = explainer.explain(top_tok[0::2], top_act[0::2], vocab)
    sample_ok = np.asarray(r["sample_row"][f]) >= 0
    pos = np.concatenate([top_tok[1::2], np.asarray(r["sample_tokens"][f])[sample_ok]])
    neg_codes = np.asarray(r["neg_codes"])
    silent = neg_codes[:, f] == 0 if len(neg_codes) else np.zeros(0, dtype=bool)
    neg = np.asarray(r["neg_tokens"])[silent][:max_negatives]
    if len(pos) == 0 or len(neg) == 0:
        return expl.text, float("nan")
    windows = np.concatenate([pos, neg])
    truth = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    return expl.text, f1(explainer.detect(expl, windows, None, vocab), truth)
