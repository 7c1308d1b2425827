"""Features across depth.

Multi-layer SAE (one dictionary for every layer): each feature's layer profile from its activation mass per
layer: the distribution over layers, its mean layer, entropy (nats) and the number of layers where it fires
(MLSAE paper's analyses). Crosscoder: the profile of its decoder norm over the output layers.

Matched pairs of per-layer SAEs (`match_pairs`): adjacent SAEs of a bank (one SAE per layer of the same
site; kind "bank"), the feature-flow pairs resid.L -> mlp_out.L / attn_out.L -> resid.L+1 where those SAEs
exist (kind "cross-site"), and pairs the user names (`strata analyze --match UP:DOWN`, kind "user"). A
feature of the upstream SAE gets the `m` downstream features with the most similar decoder directions as
candidates; each candidate is scored by activation correlation (streamed, similarity.py), causal effect
(causal.py) and the weight-only SAE Match assignment (saematch.py). The best match is the candidate with
the largest causal effect (at least `min_effect`), or, where no causal effect was measured, the highest
correlation (at least `min_link`). Chaining the best matches of a bank gives paths through depth.
"""
from __future__ import annotations

import torch

from activations.errors import StrataError
from activations.hooks import key_depth, split_key
from sae.modes import split_seed

RESIDUAL_SITES = ("resid", "mlp_out", "attn_out")  # sites that live in (and write into) the residual basis
METHOD_BITS = {"cosine": 1, "correlation": 2, "causal": 4, "saematch": 8}


def layer_profile(layer_sum: torch.Tensor, layer_count: torch.Tensor, layers: list[int]) -> dict:
    """layer_sum/count [n, L] -> mass [n, L], mean_layer [n], layer_entropy [n], n_layers_active [n]."""
    total = layer_sum.sum(1, keepdim=True)
    mass = torch.where(total > 0, layer_sum / total.clamp(min=1e-300), torch.zeros_like(layer_sum))
    lay = torch.tensor(layers, dtype=mass.dtype)
    mean_layer = torch.where(total.squeeze(1) > 0, (mass * lay).sum(1), torch.full_like(total.squeeze(1), float("nan")))
    plogp = torch.where(mass > 0, mass * mass.clamp(min=1e-300).log(), torch.zeros_like(mass))
    return {"layer_mass": mass.float(), "mean_layer": mean_layer.float(), "layer_entropy": (-plogp.sum(1)).float(),
            "n_layers_active": (layer_count > 0).sum(1).int()}


def decoder_layer_norms(W_dec: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Crosscoder decoder [n, n_blocks * d] -> the norm of each output layer's block [n, n_blocks]."""
    n, d_out = W_dec.shape
    return W_dec.detach().float().reshape(n, n_blocks, d_out // n_blocks).norm(dim=2)


def banks(saes: dict) -> list[list[str]]:
    """Groups of per-layer SAEs (mode layer/transcoder, one in key) of the same site, mode and init seed
    (`strata train --seeds`), sorted by layer, with equal output sizes; only groups of two or more."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for sae_id, sae in saes.items():
        cfg = sae.cfg
        if cfg.mode not in ("layer", "transcoder") or len(cfg.in_keys) != 1:
            continue
        site, layer = split_key(cfg.in_keys[0])
        groups.setdefault((cfg.mode, site, cfg.d_out, split_seed(sae_id)[1]), []).append((layer, sae_id))
    return [[sid for _, sid in sorted(g)] for g in groups.values() if len(g) >= 2]


def _per_layer(sae) -> bool:
    return sae.cfg.mode in ("layer", "transcoder") and len(sae.cfg.in_keys) == 1


def check_pair(saes: dict, up: str, down: str) -> None:
    """A user's pair UP:DOWN must name two per-layer SAEs writing into one space, UP before DOWN."""
    for sid in (up, down):
        if sid not in saes:
            raise StrataError(f"--match {up}:{down}: no SAE {sid!r} in this training run; choose from "
                              f"{', '.join(saes)}")
    if up == down:
        raise StrataError(f"--match {up}:{down} pairs an SAE with itself; name two different SAEs")
    for sid in (up, down):
        if not _per_layer(saes[sid]):
            raise StrataError(f"--match {up}:{down}: {sid} is a {saes[sid].cfg.mode} SAE; matches pair two "
                              "per-layer SAEs (a multi-layer SAE's depth view is its layer profile)")
    a, b = saes[up].cfg, saes[down].cfg
    if a.d_out != b.d_out:
        raise StrataError(f"--match {up}:{down}: decoder directions are matched, and {up} writes {a.d_out}-wide "
                          f"vectors, {down} {b.d_out}-wide; pick two SAEs of the same model width (different "
                          "numbers of latents are fine)")
    sa, sb = split_key(a.out_keys[0])[0], split_key(b.out_keys[0])[0]
    if sa != sb and not (sa in RESIDUAL_SITES and sb in RESIDUAL_SITES):
        raise StrataError(f"--match {up}:{down}: decoder directions are matched, and {a.out_keys[0]} and "
                          f"{b.out_keys[0]} are not one space; pair SAEs of the same site or of residual-stream "
                          f"sites ({', '.join(RESIDUAL_SITES)})")
    if key_depth(a.out_keys[0]) >= key_depth(b.in_keys[0]):
        raise StrataError(f"--match {up}:{down}: {up} ({a.out_keys[0]}) is not upstream of {down} "
                          f"({b.in_keys[0]}); put the upstream SAE first: --match {down}:{up}")


def parse_match(spec: str) -> list[tuple[str, str]]:
    """'a:b,c:d' -> [(a, b), (c, d)]."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        up, sep, down = part.partition(":")
        if not sep or not up.strip() or not down.strip():
            raise StrataError(f"--match {part!r} is not UP:DOWN; write two SAE ids, e.g. --match resid.1:resid.3")
        out.append((up.strip(), down.strip()))
    return out


def match_pairs(saes: dict, user: list[tuple[str, str]] = ()) -> list[tuple[str, str, str]]:
    """(up, down, kind) of every pair to match: bank neighbours, cross-site pairs, then the user's pairs."""
    pairs = [(a, b, "bank") for bank in banks(saes) for a, b in zip(bank, bank[1:])]
    by_key = {sae.cfg.in_keys[0]: sid for sid, sae in saes.items() if sae.cfg.mode == "layer" and _per_layer(sae)}
    for key, sid in sorted(by_key.items(), key=lambda kv: key_depth(kv[0])):
        site, layer = split_key(key)
        if site != "resid":
            continue
        for mid in ("attn_out", "mlp_out"):
            m = by_key.get(f"{mid}.{layer}")
            if m is None or saes[m].cfg.d_out != saes[sid].cfg.d_out:
                continue
            pairs.append((sid, m, "cross-site"))
            nxt = by_key.get(f"resid.{layer + 1}")
            if nxt is not None and saes[nxt].cfg.d_out == saes[m].cfg.d_out:
                pairs.append((m, nxt, "cross-site"))
    for up, down in user:
        check_pair(saes, up, down)
        if all((up, down) != p[:2] for p in pairs):
            pairs.append((up, down, "user"))
    return pairs


def best_by_effect(cand_idx, effect, min_effect: float):
    """The candidate with the largest causal effect -> (column [n], idx [n], -1 where no effect >= min_effect)."""
    score = torch.nan_to_num(effect, nan=-torch.inf)
    col = score.argmax(1)
    best = torch.gather(score, 1, col.unsqueeze(1)).squeeze(1)
    idx = torch.where(best >= min_effect, torch.gather(cand_idx, 1, col.unsqueeze(1)).squeeze(1).to(torch.int32),
                      torch.full_like(col, -1, dtype=torch.int32))
    return col, idx


def agreement(picks: dict, best_idx: torch.Tensor) -> torch.Tensor:
    """Bitmask per upstream feature of the methods (METHOD_BITS) whose own top pick equals best_idx."""
    agree = torch.zeros(len(best_idx), dtype=torch.uint8)
    for method, pick in picks.items():
        hit = (pick.to(torch.int32) == best_idx) & (best_idx >= 0)
        agree |= hit.to(torch.uint8) * METHOD_BITS[method]
    return agree


def best_matches(cand_idx, cand_cos, corr):
    """From candidates [n, m]: the best next feature (highest correlation; cosine breaks ties) -> (idx, corr, cos)."""
    score = corr + 1e-6 * cand_cos
    best = score.argmax(1, keepdim=True)
    return (torch.gather(cand_idx, 1, best).squeeze(1), torch.gather(corr, 1, best).squeeze(1),
            torch.gather(cand_cos, 1, best).squeeze(1))


def chain_paths(next_idx: list[torch.Tensor], next_corr: list[torch.Tensor], sizes: list[int],
                min_link: float = 0.3, max_paths: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow best matches through a bank of len(sizes) SAEs (next_idx[i], next_corr[i]: SAE i -> i + 1).

    A path starts at every feature that is not the target of a strong link from the SAE before, and
    follows links with correlation >= min_link. Returns (paths [P, n_saes]: the feature in each SAE or -1,
    score [P]: mean link correlation), longest then strongest first, at most max_paths, at least one link."""
    n_saes = len(sizes)
    paths, scores = [], []
    for s in range(n_saes - 1):
        cur = torch.arange(sizes[s])
        if s > 0:
            targeted = torch.zeros(sizes[s], dtype=torch.bool)
            targeted[next_idx[s - 1][next_corr[s - 1] >= min_link]] = True
            cur = cur[~targeted]
        rows = torch.full((len(cur), n_saes), -1, dtype=torch.long)
        rows[:, s] = cur
        alive = torch.ones(len(cur), dtype=torch.bool)
        total, links = torch.zeros(len(cur)), torch.zeros(len(cur))
        for i in range(s, n_saes - 1):
            c = next_corr[i][cur].float()
            ok = alive & (c >= min_link)
            nxt = next_idx[i][cur]
            rows[ok, i + 1] = nxt[ok]
            total += torch.where(ok, c, torch.zeros_like(c))
            links += ok.float()
            alive, cur = ok, torch.where(ok, nxt, cur)
        keep = links > 0
        paths.append(rows[keep])
        scores.append(total[keep] / links[keep])
    if not paths:
        return torch.full((0, n_saes), -1, dtype=torch.long), torch.zeros(0)
    p, sc = torch.cat(paths), torch.cat(scores)
    length = (p >= 0).sum(1).float()
    order = torch.argsort(length * 10 + sc, descending=True, stable=True)[:max_paths]
    return p[order], sc[order]


def finish_match(m: dict, effect: torch.Tensor | None, saematch: tuple | None, min_effect: float,
                 min_link: float) -> dict:
    """Complete one match record (candidates with cos/corr from the pass) with the causal effects (or None:
    not measured) and the SAE Match assignment (idx, score) or None: best_*, saematch_*, agree, methods,
    agreement (fraction of features with a best match whose pick each method shares)."""
    cand, cos, corr = m["cand_idx"].long(), m["cand_cos"], m["cand_corr"]
    n = len(cand)
    methods = ["cosine", "correlation"]
    corr_col = (corr + 1e-6 * cos).argmax(1)
    picks = {"cosine": cand[:, 0], "correlation": cand.gather(1, corr_col[:, None]).squeeze(1)}
    # without a causal effect (none measured, or this feature never ablated) the best match is the most
    # correlated candidate, if its correlation reaches min_link
    col = corr_col
    best = torch.where(corr.gather(1, col[:, None]).squeeze(1) >= min_link, picks["correlation"], -1).to(torch.int32)
    best_effect = torch.full((n,), float("nan"))
    if effect is not None:
        methods.append("causal")
        c_col, c_best = best_by_effect(cand, effect, min_effect)
        picks["causal"] = c_best
        measured = ~torch.isnan(effect).all(1)
        col = torch.where(measured, c_col, col)
        best = torch.where(measured, c_best, best)
        best_effect = torch.where(measured, effect.gather(1, c_col[:, None]).squeeze(1), best_effect)
    m["cand_effect"] = effect if effect is not None else torch.full(cand.shape, float("nan"))
    if saematch is not None:
        methods.append("saematch")
        m["saematch_idx"], m["saematch_score"] = saematch
        picks["saematch"] = saematch[0]
    else:
        m["saematch_idx"], m["saematch_score"] = torch.full((n,), -1, dtype=torch.int32), torch.full((n,), float("nan"))
    m.update(best_idx=best.to(torch.int32), best_effect=best_effect.float(),
             best_corr=corr.gather(1, col[:, None]).squeeze(1), best_cos=cos.gather(1, col[:, None]).squeeze(1),
             methods=methods)
    m["agree"] = agreement(picks, m["best_idx"])
    has = m["best_idx"] >= 0
    m["agreement"] = {k: float(((m["agree"][has] & METHOD_BITS[k]) > 0).float().mean()) if has.any() else 0.0
                      for k in methods}
    return m
