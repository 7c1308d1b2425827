"""The analysis pass proper: stream blocks of tokens through every SAE once and collect, per SAE, the feature
statistics (indexer.py), nearest neighbours by decoder cosine, layer profiles, and adjacent-layer matches
with paths through depth (depth.py), plus the residual stream's similarity between adjacent layers.

Independent of where blocks come from (a run on disk or arrays in memory) and of what is written.
"""
from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from sae.analysis import depth
from sae.analysis.indexer import Block, IndexerSettings, SaeIndexer
from sae.analysis.similarity import PairCorrelation, ResidualSimilarity, correlation, topk_cosine


def slots_of(sae) -> list[list[str]]:
    """Multi-layer SAE: each of its layers is encoded separately; any other SAE: one input of all in_keys."""
    return [[k] for k in sae.cfg.in_keys] if sae.cfg.mode == "multilayer" else [list(sae.cfg.in_keys)]


def keys_needed(saes: dict) -> list[str]:
    return sorted({k for sae in saes.values() for k in sae.cfg.in_keys})


@torch.no_grad()
def index_saes(saes: dict, blocks: Iterable[Block], settings: IndexerSettings, device,
               residual_pairs: list[tuple[str, str]] = (), n_neighbours: int = 10, match_candidates: int = 5,
               min_link: float = 0.3, progress=None, pairs: list[tuple[str, str, str]] | None = None) -> dict:
    """Returns {"saes": {sae_id: {field: tensor}}, "matches": [...], "paths": [...], "residual_similarity": [...],
    "seconds": s}. `pairs` (up, down, kind) to match: default depth.match_pairs(saes) (banks and cross-site)."""
    t0 = time.perf_counter()
    indexers = {sid: SaeIndexer(sae, slots_of(sae), settings, device) for sid, sae in saes.items()}
    pairs = depth.match_pairs(saes) if pairs is None else pairs
    cands = {}
    for a, b, _ in pairs:
        idx, cos = topk_cosine(saes[a].W_dec.detach().to(device), saes[b].W_dec.detach().to(device), match_candidates)
        rows = torch.arange(len(idx), device=idx.device).unsqueeze(1).expand_as(idx)
        cands[(a, b)] = (idx, cos, PairCorrelation(rows, idx, int(saes[b].cfg.n_latents)))
    resid = ResidualSimilarity()

    n_blocks = 0
    for block in blocks:
        lo, hi = block.core
        sparse = {sid: ix.update(block) for sid, ix in indexers.items()}
        for (a, b), (_, _, pc) in cands.items():
            pc.add(sparse[a][0], sparse[b][0], hi - lo)
        if residual_pairs:
            resid.add(list(residual_pairs), {k: block.acts[k][lo:hi] for p in residual_pairs for k in p})
        n_blocks += 1
        if progress:
            progress(n_blocks, hi - lo)

    out = {}
    for sid, ix in indexers.items():
        r = ix.finalize()
        W = saes[sid].W_dec.detach().to(device)
        nb_idx, nb_cos = topk_cosine(W, W, n_neighbours, exclude_self=True)
        r["neighbour_idx"], r["neighbour_cos"] = nb_idx.cpu(), nb_cos.cpu()
        cfg = saes[sid].cfg
        if cfg.mode == "multilayer":
            r.update(depth.layer_profile(r["layer_sum"], r["layer_count"], cfg.layers))
        if cfg.mode == "crosscoder" and len(cfg.out_keys) > 1:
            r["decoder_layer_norm"] = depth.decoder_layer_norms(saes[sid].W_dec, len(cfg.out_keys))
        out[sid] = r

    matches = []
    for a, b, kind in pairs:
        idx, cos, pc = cands[(a, b)]
        ra, rb = out[a], out[b]
        idx_c = idx.cpu()
        corr = correlation(float(ra["vectors"]), ra["sum"].unsqueeze(1), ra["sumsq"].unsqueeze(1),
                           rb["sum"][idx_c], rb["sumsq"][idx_c], pc.xy_sums().cpu()).float()
        matches.append({"up": a, "down": b, "up_key": saes[a].cfg.out_keys[0], "down_key": saes[b].cfg.in_keys[0],
                        "kind": kind, "cand_idx": idx_c.to(torch.int32), "cand_cos": cos.cpu(), "cand_corr": corr})
        if kind == "bank":  # the per-SAE fields of older indexes, kept
            best, best_corr, best_cos = depth.best_matches(idx_c, cos.cpu(), corr)
            ra.update(match_next=b, match_idx=idx_c, match_cos=cos.cpu(), match_corr=corr, best_next_idx=best,
                      best_next_corr=best_corr, best_next_cos=best_cos)
    return {"saes": out, "matches": matches, "paths": bank_paths(saes, matches, min_link),
            "residual_similarity": resid.result(), "seconds": time.perf_counter() - t0, "blocks": n_blocks}


def bank_paths(saes: dict, matches: list[dict], min_link: float, min_effect: float | None = None) -> list[dict]:
    """Paths through each bank by chaining best matches: by causal effect where every link of the bank has
    them (`best_idx` / `best_effect`, set by depth.finish_match; links kept at >= min_effect), otherwise by
    activation correlation (each feature's most correlated candidate; links kept at >= min_link)."""
    by_pair = {(m["up"], m["down"]): m for m in matches}
    paths = []
    for bank in depth.banks(saes):
        links = [by_pair.get(p) for p in zip(bank, bank[1:])]
        if any(m is None for m in links):
            continue
        causal = min_effect is not None and all("causal" in m.get("methods", ()) for m in links)
        if causal:
            best = [(m["best_idx"].long(), m["best_effect"]) for m in links]
        else:
            best = [depth.best_matches(m["cand_idx"].long(), m["cand_cos"], m["cand_corr"])[:2] for m in links]
        sizes = [int(saes[s].cfg.n_latents) for s in bank]
        p, score = depth.chain_paths([b[0] for b in best], [b[1] for b in best], sizes,
                                     min_link=min_effect if causal else min_link)
        paths.append({"saes": bank, "features": p, "score": score, "method": "causal" if causal else "correlation"})
    return paths
