"""The truth suite: SAEs trained on a synthetic run (`strata synth`) scored against the features that made it.

Per SAE and per output key (sae/evals/truth_scores.py; a feature is recovered at decoder cosine >= 0.9):
    truth_mmcs       mean over the key's true features of their best decoder cosine
    truth_recall     fraction of true features recovered
    truth_precision  fraction of the latents active at that key whose decoder matches a true feature
    truth_f1         their harmonic mean
Decoders are compared in each key's own space: a layer SAE's at its key, a multi-layer SAE's shared decoder at
every key, a transcoder's at mlp_out.L (the features block L writes: new or rotated at L+1), a crosscoder's
block of each key. A latent is *active at a key* when it fires there on the held-out tokens (a crosscoder's
also needs a decoder block at least 10% as long as its longest).
    truth_profile_iou  (multi-layer SAEs, crosscoders) mean over latents that represent a true feature at some
                     key of the Jaccard index between the keys where it is active (fires on >= 10% as many
                     tokens as at its busiest key; crosscoder: decoder block >= 10% of its longest) and the keys
                     where its decoder matches a true feature there: its layer profile against the true lifetime
Cross-layer matches: when RUN/index/<name>.h5 holds matches (`strata analyze`), every method's links are scored
against the lineage (truth_scores.score_links): per match group (matches/<j>: cosine, correlation, causal,
saematch) or, in older indexes, each bank SAE's best_next_idx ("best_next"). Latents are mapped to their true
feature; a link is correct when the two features are related in the lineage. Results: the upstream SAE's
truth_match_<method>_{precision,recall,f1} and details["matching"] (summed over pairs).
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import torch

from activations import layout
from activations.reader import ActivationReader
from activations.synth import Truth, load_truth
from sae.evals.suite import SuiteContext
from sae.evals.truth_scores import (
    RECOVERED_COS,
    cosines,
    dictionary_scores,
    latent_map,
    profile_iou,
    related_pairs,
    score_links,
)
from sae.modes import Unit

ACTIVE_SHARE = 0.1  # "active at a key": >= 10% of the latent's busiest key (firings, or crosscoder block norm)
MATCH_METHODS = ("cosine", "correlation", "causal", "saematch")


def check(cfg, run) -> None:
    """Before anything runs: the run must be synthetic and hold its record."""
    load_truth(run.path)


@torch.no_grad()
def run(ctx: SuiteContext) -> dict:
    truth = load_truth(ctx.run.path)
    fired = firing_counts(ctx)
    saes, maps = {}, {}
    for sid, sae in ctx.saes.items():
        saes[sid], maps[sid] = score_sae(sae, fired[sid], truth)
    details = {"recovered_cos": RECOVERED_COS, "active_share": ACTIVE_SHARE}
    links = index_links(layout.index_path(ctx.run.path, ctx.name), ctx.saes)
    if isinstance(links, str):
        details["matching"] = links
        print(f"eval: truth: {links}")
    else:
        details["matching"] = score_matching(links, maps, truth, saes)
    return {"saes": saes, "details": details}


@torch.no_grad()
def firing_counts(ctx: SuiteContext) -> dict:
    """sid -> int64 [n_latents, n_out_keys]: held-out tokens on which each latent fires, per output key."""
    units = [Unit(sid, sae) for sid, sae in ctx.saes.items()]
    keys = sorted({k for u in units for k in u.needed_keys})
    counts = {u.sae_id: torch.zeros(u.sae.cfg.n_latents, len(u.out_keys), dtype=torch.int64) for u in units}
    reader = ActivationReader(ctx.run, keys, ctx.cfg.batch_size, shards=ctx.heldout, shuffle=False,
                              exclude_first=ctx.cfg.exclude_first)
    seen = 0
    for batch in reader:
        acts = {k: v.to(ctx.device) for k, v in batch.acts.items()}
        for u in units:
            x, _ = u.io(acts)
            fires = u.sae.encode_n(x) > 0
            if u.sae.cfg.mode == "multilayer":  # the keys are stacked along the batch
                per_key = torch.stack([f.sum(0) for f in fires.chunk(len(u.out_keys))], 1)
            else:
                per_key = fires.sum(0, keepdim=True).T.expand(-1, len(u.out_keys))
            counts[u.sae_id] += per_key.cpu()
        seen += batch.rows.numel()
        if ctx.cfg.max_tokens and seen >= ctx.cfg.max_tokens:
            break
    return {sid: c.numpy() for sid, c in counts.items()}


def decoder_blocks(sae) -> list[np.ndarray]:
    """The decoder in each output key's space: [n_latents, d] per key."""
    W = sae.W_dec.detach().float().cpu().numpy()
    keys = sae.cfg.out_keys
    return np.split(W, len(keys), axis=1) if sae.cfg.mode == "crosscoder" else [W] * len(keys)


def score_sae(sae, fired_LK: np.ndarray, truth: Truth) -> tuple[dict, dict]:
    """({"overall", "per_key"} metrics, {key: latent -> true feature id or -1}) of one SAE."""
    keys = list(sae.cfg.out_keys)
    blocks = decoder_blocks(sae)
    norms_LK = np.stack([np.linalg.norm(b, axis=1) for b in blocks], 1)
    if sae.cfg.mode == "crosscoder":
        active_LK = (fired_LK > 0) & (norms_LK >= ACTIVE_SHARE * norms_LK.max(1, keepdims=True))
    elif sae.cfg.mode == "multilayer":
        active_LK = (fired_LK > 0) & (fired_LK >= ACTIVE_SHARE * fired_LK.max(1, keepdims=True))
    else:
        active_LK = fired_LK > 0
    matches_LK = np.zeros(active_LK.shape, dtype=bool)
    per_key, maps = {}, {}
    for j, key in enumerate(keys):
        ids, dirs = truth.key_features(key)
        cos = cosines(blocks[j], dirs)
        s = dictionary_scores(cos, active_LK[:, j])
        if s:
            per_key[key] = {f"truth_{m}": s[m] for m in ("mmcs", "recall", "precision", "f1")}
            matches_LK[:, j] = cos.max(1) >= RECOVERED_COS
        maps[key] = latent_map(cos, ids)
    overall = {f"truth_{m}": float(np.mean([v[f"truth_{m}"] for v in per_key.values()]))
               for m in ("mmcs", "recall", "precision", "f1")} if per_key else {}
    if sae.cfg.mode in ("multilayer", "crosscoder") and len(keys) > 1:
        overall["truth_profile_iou"] = profile_iou(active_LK, matches_LK)
    return {"overall": overall, "per_key": per_key}, maps


def index_links(path, saes: dict) -> list[dict] | str:
    """Every scored link set in the feature index: [{up, down, up_key, down_key, method, pred [n_up]}], or a note
    saying why there is none."""
    if not path.is_file():
        return f"no feature index {path}: run `strata analyze` on this training run to score cross-layer matches"
    out = []
    with h5py.File(path, "r") as f:
        for sid in f.get("saes", {}):
            info = json.loads(f["saes"][sid].attrs.get("info", "{}"))
            if sid in saes and int(info.get("cfg", {}).get("tokens_seen", -1)) != int(saes[sid].cfg.tokens_seen):
                return f"the feature index {path} was made from other weights than the checkpoint: run `strata analyze` again"
            if info.get("match_next") and "best_next_idx" in f["saes"][sid]:
                key = lambda s: saes[s].cfg.in_keys[0] if s in saes else None  # noqa: E731
                out.append({"up": sid, "down": info["match_next"], "up_key": key(sid), "down_key": key(info["match_next"]),
                            "method": "best_next", "pred": f["saes"][sid]["best_next_idx"][:]})
        for j in f.get("matches", {}):
            g = f["matches"][j]
            a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.attrs.items()}
            methods = json.loads(a.get("methods", "[]"))
            base = {"up": a["up"], "down": a["down"], "up_key": a["up_key"], "down_key": a["down_key"]}
            for m in methods:
                pred = _method_pred(g, m)
                if pred is not None:
                    out.append(base | {"method": m, "pred": pred})
    return out or f"the feature index {path} holds no cross-layer matches (it needs a bank of two or more SAEs)"


def _method_pred(g, method: str) -> np.ndarray | None:
    """Each method's own top pick per upstream feature (-1 = none) from a matches/<j> group."""
    if method == "causal" and "best_idx" in g:
        return g["best_idx"][:]
    if method == "saematch" and "saematch_idx" in g:
        return g["saematch_idx"][:]
    score = {"cosine": "cand_cos", "correlation": "cand_corr"}.get(method)
    if score is None or score not in g or "cand_idx" not in g:
        return None
    cand, s = g["cand_idx"][:], np.nan_to_num(g[score][:].astype(np.float64), nan=-np.inf)
    pick = s.argmax(1)
    return np.where(np.isfinite(s.max(1)), cand[np.arange(len(cand)), pick], -1)


def score_matching(links: list[dict], maps: dict, truth: Truth, saes: dict) -> dict:
    """Per method, links of every pair scored against the lineage; summed over pairs (micro average)."""
    totals: dict[str, dict] = {}
    for link in links:
        if link["up"] not in maps or link["down"] not in maps or link["up_key"] is None:
            continue
        up_map, down_map = maps[link["up"]][link["up_key"]], maps[link["down"]][link["down_key"]]
        pairs = related_pairs(truth.lineage, truth.key_layer(link["up_key"]), truth.key_layer(link["down_key"]))
        s = score_links(link["pred"], up_map, down_map, pairs)
        m = link["method"]
        saes[link["up"]]["overall"].update({f"truth_match_{m}_{k}": s[k] for k in ("precision", "recall", "f1")})
        t = totals.setdefault(m, {"correct": 0.0, "links": 0, "found": 0.0, "true_links": 0})
        t["correct"] += s["precision"] * s["links"]
        t["links"] += s["links"]
        t["found"] += s["recall"] * s["true_links"]
        t["true_links"] += s["true_links"]
    out = {}
    for m, t in totals.items():
        p = t["correct"] / t["links"] if t["links"] else 0.0
        r = t["found"] / t["true_links"] if t["true_links"] else 0.0
        out[m] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                  "links": t["links"], "true_links": t["true_links"]}
    return out
