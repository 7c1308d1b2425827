"""Pruning by indirect influence, and the graph scores, defined as circuit-tracer defines them.

A is the adjacency with each row's |weights| normalised to sum 1 (rows = targets, columns = sources). The
influence of every node on the logits, weighted by the logits' probabilities w, is w (A + A^2 + ...) =
w ((I - A)^-1 - I); the series ends because the graph is acyclic. Pruning keeps the nodes carrying
`node_threshold` of the total influence (tokens and logits always), then the edges carrying `edge_threshold` of
the edge influence in the node-pruned graph, then drops feature and error nodes left without outgoing (and
features without incoming) edges. Node order everywhere: features, errors, tokens, logits.

The score written as each node's `influence` is circuit-tracer's cumulative one: nodes sorted by raw influence,
most influential first, each node's score is the running sum of the normalised influence up to and including it
(so the most influential node holds its share of the total, and a node with score <= 0.8 survives an 0.8 node
threshold). The raw probability-weighted influence is `Pruned.raw_influence`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def normalize(adj: torch.Tensor) -> torch.Tensor:
    a = adj.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def influence(a_norm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights (A + A^2 + ...) by repeated vector-matrix products (at most N of them: A is nilpotent)."""
    total = torch.zeros_like(weights)
    cur = weights @ a_norm
    for _ in range(a_norm.shape[0]):
        if not bool(cur.any()):
            break
        total += cur
        cur = cur @ a_norm
    return total


def threshold_of(scores: torch.Tensor, fraction: float) -> float:
    """The smallest score among the top scores that together hold `fraction` of the total."""
    s = scores.flatten().sort(descending=True).values
    if s.numel() == 0 or float(s.sum()) <= 0:
        return 0.0
    cum = s.cumsum(0) / s.sum()
    i = min(int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype))), s.numel() - 1)
    return float(s[i])


def cumulative(scores: torch.Tensor) -> torch.Tensor:
    """Each node's running share of the total, the nodes taken in decreasing order of score (circuit-tracer's
    cumulative influence); all zero when nothing has influence."""
    s, order = scores.sort(descending=True)
    total = s.sum()
    out = torch.zeros_like(scores)
    if float(total) > 0:
        out[order] = s.cumsum(0) / total
    return out


@dataclass
class Pruned:
    node_mask: torch.Tensor      # [N] bool
    edge_mask: torch.Tensor      # [N, N] bool
    influence: torch.Tensor      # [N] cumulative influence (circuit-tracer's node score; smaller = more influential)
    influence_kept: float        # share of the total node influence held by the kept nodes
    raw_influence: torch.Tensor  # [N] probability-weighted influence of each node on the logits (full graph)


def prune(adj: torch.Tensor, logit_probs: torch.Tensor, n_features: int, n_tokens: int,
          node_threshold: float = 0.8, edge_threshold: float = 0.98, pinned: torch.Tensor | None = None) -> Pruned:
    N, K = adj.shape[0], logit_probs.numel()
    w = torch.zeros(N)
    w[N - K:] = logit_probs
    node_infl = influence(normalize(adj), w)
    nodes = node_infl >= threshold_of(node_infl, node_threshold)
    nodes[N - K - n_tokens:] = True
    if pinned is not None:
        nodes[pinned] = True
    a = adj.clone()
    a[~nodes] = 0
    a[:, ~nodes] = 0
    a_norm = normalize(a)
    edge_scores = a_norm * (influence(a_norm, w) + w)[:, None]
    edges = (edge_scores >= threshold_of(edge_scores, edge_threshold)) & (edge_scores > 0)
    body = N - K - n_tokens
    for _ in range(N):  # drop nodes left without outgoing (features, errors) or incoming (features) edges
        before = nodes.clone()
        nodes[:body] &= edges[:, :body].any(0)
        nodes[:n_features] &= edges[:n_features].any(1)
        if pinned is not None:
            nodes[pinned] = True
        edges &= nodes[:, None] & nodes[None, :]
        if bool((before == nodes).all()):
            break
    total = float(node_infl[:N - K].sum())
    kept = min(1.0, float(node_infl[:N - K][nodes[:N - K]].sum()) / total) if total > 0 else 1.0
    return Pruned(nodes, edges, cumulative(node_infl), kept, node_infl)


def graph_scores(adj: torch.Tensor, logit_probs: torch.Tensor, n_features: int, n_errors: int) -> tuple[float, float]:
    """(replacement score, completeness score). Replacement: of the influence reaching the logits from tokens and
    errors (the graph's two kinds of roots), the share that starts at tokens (flows through features only).
    Completeness: the share of each node's normalised input that does not come straight from an error node,
    averaged with each node's influence on the logits (plus the logits themselves) as weights."""
    N, K = adj.shape[0], logit_probs.numel()
    w = torch.zeros(N)
    w[N - K:] = logit_probs
    a_norm = normalize(adj)
    infl = influence(a_norm, w)
    err = slice(n_features, n_features + n_errors)
    tok = slice(n_features + n_errors, N - K)
    token_infl, error_infl = float(infl[tok].sum()), float(infl[err].sum())
    replacement = token_infl / (token_infl + error_infl) if token_infl + error_infl > 0 else 0.0
    non_error = 1 - a_norm[:, err].sum(1)
    out = infl + w
    completeness = float((non_error * out).sum() / out.sum())
    return replacement, completeness
