"""Features across depth.

Multi-layer SAE (one dictionary for every layer): each feature's layer profile from its activation mass per
layer: the distribution over layers, its mean layer, entropy (nats) and the number of layers where it fires
(MLSAE paper's analyses). Crosscoder: the profile of its decoder norm over the output layers.

Per-layer banks (one SAE per layer of the same site): a feature of layer L is matched to the features of the
next SAE in the bank. Candidates are the `m` most similar decoder directions (cosine); the match is the
candidate with the highest activation correlation on the analysed tokens (correlation needs both SAEs on
the same tokens, so it is streamed; see similarity.py). Chaining each feature's best match gives paths
through depth; a path is cut where the link's correlation falls below `min_link`.
"""
from __future__ import annotations

import torch

from activations.hooks import split_key
from sae.modes import split_seed


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
