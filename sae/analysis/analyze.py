"""`strata analyze RUN`: index the features of every SAE of a training run into RUN/index/<name>.h5.

Steps: load the SAEs (sae.checkpoint.load_saes), stream the held-out shards (or all) through them once
(stream.py), add logit effects from the model's final norm and unembedding (causal LMs), score the matches
between SAEs across depth by causal effect through the model (causal.py) and by SAE Match (saematch.py),
explain and score every feature with the offline token explainer (explain.py), write the index atomically
(index_file.py).
A slower explainer (openai, transformers) runs after that, its explanations swapped into the written index
(explain_index.py), so a rate limit or a dead server after the pass loses nothing: `--explain-only` continues.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import torch
from annotated_types import Ge, Gt, Interval

from activations import layout
from activations.config import option as _f
from activations.errors import StrataError
from activations.lock import run_lock
from activations.synth import is_synthetic
from sae.analysis import depth
from sae.analysis.explain import ExplainerError, TokenExplainer, make_explainer
from sae.analysis.explain_index import (
    FALLBACK,
    explain_in_memory,
    explain_into_index,
    explain_limit,
    read_back,
)
from sae.analysis.heads import attributable, attribute_heads
from sae.analysis.index_file import FeatureIndex, write_index
from sae.analysis.indexer import IndexerSettings
from sae.analysis.source import run_blocks
from sae.analysis.stream import index_saes, keys_needed, slots_of
from sae.models import use_precision
from sae.train_folder import read_config

LOGIT_SITES = ("resid", "mlp_out", "attn_out")  # sites that add into the residual stream


@dataclass
class AnalyzeConfig:
    run_dir: str = _f("", "run directory", cli=False)
    name: str = _f("", "training run to index (RUN/train/<name>); empty = every one")
    data: Literal["heldout", "all"] = _f("heldout", "which shards: heldout (last shards, as eval) or all")
    heldout_fraction: Annotated[float, Interval(ge=0, lt=1)] = _f(0.1, "fraction of shards held out (as in training)")
    max_tokens: Annotated[int, Ge(0)] = _f(0, "stop after this many tokens (0 = all selected shards)")
    batch_size: Annotated[int, Gt(0)] = _f(1024, "tokens encoded at once")
    top_k: Annotated[int, Gt(0)] = _f(20, "top activating contexts kept per feature")
    window: Annotated[int, Ge(0)] = _f(5, "context tokens shown each side of the peak")
    intervals: Annotated[int, Gt(0)] = _f(5, "quantile intervals of example activations")
    per_interval: Annotated[int, Gt(0)] = _f(5, "examples per quantile interval")
    neighbours: Annotated[int, Ge(0)] = _f(10, "nearest features by decoder cosine")
    logits: Annotated[int, Ge(0)] = _f(10, "promoted and suppressed tokens per feature (causal LMs)")
    match_candidates: Annotated[int, Gt(0)] = _f(5, "next-layer candidates (decoder cosine) per feature")
    min_link: Annotated[float, Interval(ge=-1, le=1)] = _f(0.3, "least activation correlation that continues a path "
                                                                "(where no causal effect was measured)")
    match: str = _f("", "more SAE pairs to match, UP:DOWN by SAE id, comma-separated (e.g. resid.1:resid.3); "
                        "adjacent SAEs of a bank and resid -> mlp_out/attn_out -> resid are matched anyway")
    causal_tokens: Annotated[int, Ge(0)] = _f(4096, "analysed tokens (whole contexts, chosen to hold firings of as "
                                                    "many upstream features as possible) on which upstream features "
                                                    "are ablated through the model for the causal check (0 = skip)")
    causal_rounds: Annotated[int, Gt(0)] = _f(2, "ablations per token in the causal check (each round ablates one "
                                                 "active upstream feature at every position, one forward)")
    min_effect: Annotated[float, Interval(ge=0, le=1)] = _f(0.2, "least causal effect of a best match and of a "
                                                                 "path link")
    saematch: bool = _f(True, "also match by SAE Match (weights only, one-to-one linear assignment)")
    explainer: Literal["tokens", "openai", "transformers", "none"] = _f(
        "tokens", "tokens (offline), openai (any OpenAI-compatible server), transformers (a local model), or none")
    explainer_model: str = _f("", "model for the openai/transformers explainers")
    explainer_url: str = _f("", "OpenAI-compatible base URL, e.g. http://localhost:8080/v1")
    explain_max: Annotated[int, Ge(0)] = _f(0, "explain only the first N features per SAE (0 = all)")
    explain_only: bool = _f(False, "only (re-)explain the features of an existing index, continuing where the "
                                   "explainer stopped")
    device: str = _f("auto", "cpu, cuda or auto")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto", "dtype of the SAE encoder matmul (and of the model's forward for head attribution): auto (bf16 "
                "where a one-off probe finds it >= 1.5x faster than fp32 on this machine), fp32, bf16")
    seed: Annotated[int, Ge(0)] = _f(0, "seed for the sampled examples")
    progress: bool = _f(True, "print progress to stderr")


def train_names(run) -> list[str]:
    root = layout.train_root(run)
    names = sorted(p.name for p in root.iterdir() if layout.valid_name(p.name)
                   and layout.checkpoint_dir(run, p.name).is_dir()) if root.is_dir() else []
    if not names:
        raise StrataError(f"{run} has no trained SAEs (no train/<name>/checkpoint); run `strata train {run}` first")
    return names


def select_spans(run, data: str, heldout_fraction: float) -> tuple[list[tuple[int, int]], list[int]]:
    if data not in ("heldout", "all"):
        raise StrataError(f"--data {data!r} is not a choice; use heldout or all")
    shards = {s.index: s for s in run.manifest.shards}
    ids = sorted(shards)
    if data == "heldout":
        _, held = run.split(heldout_fraction)
        ids = sorted(held) or ids  # a run too small to hold out a shard is analysed whole
    return [(shards[i].token_start, shards[i].token_start + shards[i].rows) for i in ids], ids


def load_lm(model: dict, device):
    """(the model of a manifest's model record, "") or (None, why not). Never fails: the index is still useful
    without it."""
    if is_synthetic(model):
        return None, ("synthetic run (strata synth): no model, so no logit effects (tokens shown as ids); causal "
                      "matches through the generator's known map between resid layers")
    from activations.model import load_model

    try:
        return load_model(model["id"], device=device), ""
    except StrataError as e:
        return None, f"model not loaded ({e}); no logit effects or causal matches, tokens shown as ids"


def load_vocab_and_unembedding(lm) -> tuple[list[str] | None, object, str]:
    """(decoded string of every token id, (norm, W_U) or None, note) of a loaded model."""
    from activations.hooks import unembedding
    from activations.tokens import decode_each

    vocab = decode_each(lm.tokenizer, range(len(lm.tokenizer)))
    if not lm.info.get("causal_lm"):
        return vocab, None, "not a causal LM: no logit effects"
    try:
        return vocab, unembedding(lm.model), ""
    except StrataError as e:
        return vocab, None, str(e)


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, norm, W_U: torch.Tensor, k: int, chunk: int = 512) -> dict:
    """Each decoder direction through the final norm and the unembedding: top/bottom k tokens.
    norm(d) - norm(0) removes a LayerNorm's bias, which would otherwise add the same logits to every feature."""
    W_U = W_U.detach().float()
    out = {"logit_top_ids": [], "logit_top_vals": [], "logit_bottom_ids": [], "logit_bottom_vals": []}
    zero = norm(torch.zeros(1, W_dec.shape[1], device=W_U.device)).float() if norm is not None else 0.0
    for s in range(0, len(W_dec), chunk):
        d = W_dec[s:s + chunk].detach().float().to(W_U.device)
        h = (norm(d).float() - zero) if norm is not None else d
        logits = h @ W_U.T
        top, bottom = torch.topk(logits, k, dim=1), torch.topk(logits, k, dim=1, largest=False)
        out["logit_top_ids"].append(top.indices.int().cpu())
        out["logit_top_vals"].append(top.values.cpu())
        out["logit_bottom_ids"].append(bottom.indices.int().cpu())
        out["logit_bottom_vals"].append(bottom.values.cpu())
    return {name: torch.cat(v) for name, v in out.items()}


def logit_direction(sae):
    """The decoder block that writes into the residual stream, or None for sites that do not."""
    from activations.hooks import split_key

    cfg = sae.cfg
    keys = cfg.in_keys if cfg.mode == "multilayer" else cfg.out_keys
    if not keys or split_key(keys[-1])[0] not in LOGIT_SITES:
        return None
    W = sae.W_dec.detach()
    if cfg.mode == "crosscoder" and len(cfg.out_keys) > 1:
        d = W.shape[1] // len(cfg.out_keys)
        W = W[:, -d:]  # the deepest layer's block: closest to the unembedding
    return W


def _log(cfg, msg):
    if cfg.progress:
        print(f"[analyze] {msg}", file=sys.stderr, flush=True)


def trained_exclude_first(run_dir, name: str) -> int:
    """Context positions the SAEs of train/<name> never saw (TrainConfig.exclude_first): they are not indexed."""
    saved = read_config(layout.train_dir(run_dir, name))  # a damaged config.json: one line naming it
    return int(saved["identity"].get("exclude_first", 0)) if saved is not None else 0


def analyze(cfg: AnalyzeConfig) -> list:
    """Index every requested training run of cfg.run_dir; returns the index paths written."""
    from activations.model import resolve_device
    from activations.reader import open_run

    if cfg.explain_only and cfg.explainer == "none":
        raise StrataError("--explain-only with --explainer none has nothing to do; pass --explainer tokens, openai "
                          "or transformers")
    if cfg.name:
        layout.check_name(cfg.name)  # before any work
    depth.parse_match(cfg.match)
    run = open_run(cfg.run_dir)
    device = resolve_device(cfg.device)
    names = [cfg.name] if cfg.name else train_names(cfg.run_dir)
    if cfg.match and len(names) > 1:
        raise StrataError(f"--match names SAEs of one training run; add --name (one of {', '.join(names)})")
    # the slow explainer is made (its flags checked, its model loaded) before the pass, used after each index is written
    slow = make_explainer(cfg.explainer, cfg.explainer_model, cfg.explainer_url, device=cfg.device) \
        if cfg.explainer not in ("none", FALLBACK) or cfg.explain_only else None
    with contextlib.ExitStack() as held:  # no training of these names may write while they are indexed
        for name in names:
            held.enter_context(run_lock(cfg.run_dir, f"strata analyze --name {name}", scope=f"train-{name}"))
        if cfg.explain_only:
            return _explain_only(cfg, names, slow)
        return _index_runs(cfg, run, names, device, slow)


def _index_runs(cfg: AnalyzeConfig, run, names: list, device, slow) -> list:
    """The analysis pass and index file of each training run in `names`, then the slow explainer's explanations."""
    from sae.checkpoint import load_saes

    spans, shard_ids = select_spans(run, cfg.data, cfg.heldout_fraction)
    vocab, unemb, note, lm = None, None, "", None
    written, failed = [], []
    for name in names:
        t0 = time.perf_counter()
        if not layout.checkpoint_dir(cfg.run_dir, name).is_dir():
            raise StrataError(f"no checkpoint for training run {name!r} in {cfg.run_dir}; choose one of "
                              f"{', '.join(train_names(cfg.run_dir))}")
        saes = {sid: sae.eval() for sid, sae in load_saes(cfg.run_dir, name, device).items()}
        if not saes:
            raise StrataError(f"training run {name!r} has no SAEs in its checkpoint; rerun `strata train`")
        pairs = _pairs(cfg, name, saes)  # a bad --match is refused before any work
        prec = use_precision(saes, cfg.precision, cfg.batch_size, device)
        _log(cfg, f"{name}: {prec.line()}")
        keys = keys_needed(saes)
        missing = [k for k in keys if k not in run.keys]
        if missing:
            raise StrataError(f"SAEs of {name!r} read {', '.join(missing)}, which this run did not harvest; "
                              "analyse the run they were trained on")
        resid = sorted((k for k in run.keys if k.startswith("resid.")), key=lambda k: int(k.split(".")[1]))
        residual_pairs = list(itertools.pairwise(resid))
        settings = IndexerSettings(top_k=cfg.top_k, window=cfg.window, intervals=cfg.intervals,
                                   per_interval=cfg.per_interval, sample_size=2 * cfg.intervals * cfg.per_interval,
                                   seed=cfg.seed, context=int(run.manifest.context_length),
                                   exclude_first=trained_exclude_first(cfg.run_dir, name))
        total = min(sum(b - a for a, b in spans), cfg.max_tokens or math.inf)
        done = [0]

        def progress(i, rows, name=name, total=total, done=done):
            done[0] += rows
            if i % 20 == 0 or done[0] >= total:
                _log(cfg, f"{name}: {done[0]:,}/{total:,} tokens")

        blocks = run_blocks(run, sorted(set(keys) | {k for p in residual_pairs for k in p}), spans,
                            cfg.batch_size, cfg.window, device, cfg.max_tokens)
        res = index_saes(saes, blocks, settings, device, residual_pairs, cfg.neighbours, cfg.match_candidates,
                         cfg.min_link, progress, pairs=pairs)
        _log(cfg, f"{name}: pass over {done[0]:,} tokens in {res['seconds']:.1f}s")

        if lm is None and not note:
            lm, note = load_lm(run.manifest.model, device)
            if lm is not None:
                vocab, unemb, note = load_vocab_and_unembedding(lm)
        notes = [note] if note else []
        if res["matches"]:
            t1 = time.perf_counter()
            notes += score_matches(cfg, run, saes, res, lm, spans, settings.exclude_first, device)
            res["seconds_matches"] = time.perf_counter() - t1
        for sid, sae in saes.items():
            W = logit_direction(sae)
            if unemb is not None and W is not None and W.shape[1] == unemb[1].shape[1]:
                res["saes"][sid].update(logit_effects(W, unemb[0], unemb[1], cfg.logits))
        seconds_heads, head_note = _attribute_heads(cfg, run, name, saes, res["saes"], lm, device)

        limits = {sid: explain_limit(int(sae.cfg.n_latents), cfg.explain_max) for sid, sae in saes.items()}
        if cfg.explainer != "none":
            explain_in_memory(TokenExplainer(), res["saes"], limits, vocab)
            _log(cfg, f"{name}: explained with {FALLBACK}")

        sae_info = {sid: {"cfg": _cfg_dict(sae.cfg), "n_latents": int(sae.cfg.n_latents), "mode": sae.cfg.mode,
                          "slots": slots_of(sae), "vectors": int(res["saes"][sid]["vectors"]),
                          "match_next": res["saes"][sid].get("match_next")} for sid, sae in saes.items()}
        meta = {"train_name": name, "tokens": done[0], "data": cfg.data, "shards": shard_ids,
                "config": asdict(cfg), "model": run.manifest.model, "seconds_pass": res["seconds"],
                "seconds_total": time.perf_counter() - t0, "notes": notes + ([head_note] if head_note else []),
                "seconds_matches": res.get("seconds_matches", 0.0), "seconds_heads": seconds_heads,
                "explainer": FALLBACK if cfg.explainer != "none" else "none", "precision": prec.record()}
        path = write_index(layout.index_path(cfg.run_dir, name), meta, res["saes"], sae_info, res["paths"],
                           res["residual_similarity"], vocab, res["matches"])
        _log(cfg, f"{name}: wrote {path} ({time.perf_counter() - t0:.1f}s)")
        written.append(path)
        if slow is not None and not failed:  # after one failure the endpoint is not asked again for the next runs
            current = {sid: (r["explanation"], r["explanation_score"]) for sid, r in res["saes"].items()}
            try:
                explain_into_index(path, slow, res["saes"], limits, vocab, current, {sid: 0 for sid in saes})
                _log(cfg, f"{name}: explained with {slow.name}")
            except ExplainerError as e:
                failed.append((name, str(e)))
        elif slow is not None:
            failed.append((name, ""))
    if failed:
        raise StrataError(_explainer_failed(cfg, failed))
    return written


def _attribute_heads(cfg: AnalyzeConfig, run, name: str, saes: dict, results: dict, lm, device) -> tuple[float, str]:
    """Head shares of the attention-output SAEs' top contexts (heads.py) added to `results`; (seconds, note)."""
    if not any(attributable(sae) for sae in saes.values()):
        return 0.0, ""
    if lm is None:
        return 0.0, "model not loaded: no head attribution"
    from activations.model import forward_matmul_shapes
    from activations.precision import resolve

    t0 = time.perf_counter()
    prec = resolve(cfg.precision, device, forward_matmul_shapes(lm, cfg.batch_size))
    _log(cfg, f"{name}: head attribution forward in {prec.line()}")
    try:
        found = attribute_heads(lm.model, saes, results, lambda a, b: run.read_tokens(a, b)["token_ids"],
                                int(run.manifest.context_length), cfg.batch_size, device, prec.dtype)
    except StrataError as e:
        return time.perf_counter() - t0, f"no head attribution ({e})"
    for sid, fields in found.items():
        results[sid].update(fields)
    seconds = time.perf_counter() - t0
    _log(cfg, f"{name}: attributed {', '.join(found)} to attention heads in {seconds:.1f}s")
    return seconds, ""


def _pairs(cfg: AnalyzeConfig, name: str, saes: dict) -> list:
    """The pairs to match (depth.match_pairs), the user's checked; before any work, so a bad pair writes nothing."""
    user = depth.parse_match(cfg.match)
    if user and len(saes) < 2:
        (sid,) = saes
        raise StrataError(f"--match: train/{name} has one SAE ({sid}); depth views need two or more per-layer SAEs "
                          "(or a multi-layer SAE, whose layer profile needs no match): train more layers")
    return depth.match_pairs(saes, user)


def score_matches(cfg: AnalyzeConfig, run, saes: dict, res: dict, lm, spans, exclude_first: int, device) -> list:
    """Causal effects (through the run's model, on cfg.causal_tokens analysed tokens) and SAE Match for every
    match of the pass; best matches, agreement and paths (by causal effect where measured). Returns notes."""
    from sae.analysis.causal import (
        ModelSpan,
        causal_effects,
        choose_contexts,
        context_batches,
        context_starts,
        read_key,
        truth_span,
        write_key,
    )
    from sae.analysis.saematch import sae_match
    from sae.analysis.stream import bank_paths

    notes = []
    T = int(run.manifest.context_length)
    truth = None
    if lm is None and is_synthetic(run.manifest.model):
        from activations.synth import load_truth

        truth = load_truth(cfg.run_dir)
    if cfg.causal_tokens < T:
        notes.append(f"causal effects not measured: --causal-tokens {cfg.causal_tokens} is less than one context")
    elif lm is None and truth is None:
        notes.append("causal effects not measured: no model")
    for m in res["matches"]:
        up, down = saes[m["up"]], saes[m["down"]]
        effect, span = None, None
        if cfg.causal_tokens >= T:
            span = ModelSpan(lm.model, write_key(up), read_key(down)) if lm is not None else \
                truth_span(truth, write_key(up), read_key(down)) if truth is not None else None
        if span is not None:
            fired = torch.cat([res["saes"][m["up"]]["top_row"], res["saes"][m["up"]]["sample_row"]], 1)
            starts = choose_contexts(context_starts(spans, T), fired, T, cfg.causal_tokens // T)
            batches = context_batches(run, starts, sorted({read_key(up), write_key(up)}), max(1, cfg.batch_size // T),
                                      device)
            effect, _ = causal_effects(up, down, span, batches, m["cand_idx"].to(device), cfg.causal_rounds,
                                       exclude_first)
            effect = effect.cpu()
        sm = sae_match(up, down) if cfg.saematch else None
        depth.finish_match(m, effect, sm, cfg.min_effect, cfg.min_link)
        _log(cfg, f"match {m['up']} -> {m['down']} ({m['kind']}): best match for "
                  f"{int((m['best_idx'] >= 0).sum()):,}/{len(m['best_idx']):,} features; agreement with it "
                  + ", ".join(f"{k} {v:.0%}" for k, v in m["agreement"].items()))
    res["paths"] = bank_paths(saes, res["matches"], cfg.min_link, cfg.min_effect)
    return notes


def _explain_only(cfg: AnalyzeConfig, names: list, explainer) -> list:
    """Explain the features of existing indexes, continuing where the same explainer stopped."""
    written, failed = [], []
    for name in names:
        path = layout.index_path(cfg.run_dir, name)
        if not path.is_file():
            raise StrataError(f"no index for {name!r} at {path} to explain; run `strata analyze {cfg.run_dir} "
                              f"--name {name}` first (without --explain-only)")
        idx = FeatureIndex(path)
        try:
            inputs, limits, current, start = read_back(idx, explainer.name, cfg.explain_max)
            vocab = idx.vocab
        finally:
            idx.close()
        _log(cfg, f"{name}: explaining {sum(limits.values()) - sum(start.values()):,} features with {explainer.name}")
        try:
            explain_into_index(path, explainer, inputs, limits, vocab, current, start)
        except ExplainerError as e:
            failed.append((name, str(e)))
            break
        _log(cfg, f"{name}: explained with {explainer.name}; updated {path}")
        written.append(path)
    if failed:
        raise StrataError(_explainer_failed(cfg, failed))
    return written


def _explainer_failed(cfg: AnalyzeConfig, failed: list) -> str:
    """One line: what failed, that the indexes are written, and the command that continues the explanations."""
    first = next(msg for _, msg in failed if msg)
    names = [name for name, _ in failed]
    flags = f" --explainer {cfg.explainer}" + (f" --explainer-url {cfg.explainer_url}" if cfg.explainer_url else "") \
        + (f" --explainer-model {cfg.explainer_model}" if cfg.explainer_model else "") \
        + (f" --explain-max {cfg.explain_max}" if cfg.explain_max else "")
    again = " and ".join(f"`strata analyze {cfg.run_dir} --name {n} --explain-only{flags}`" for n in names)
    paths = ", ".join(str(layout.index_path(cfg.run_dir, n)) for n in names)
    return (f"{first}; {paths} {'is' if len(names) == 1 else 'are'} written with every statistic, the offline "
            f"{FALLBACK} explanations and any {cfg.explainer} explanations finished: continue with {again}")


def _cfg_dict(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
