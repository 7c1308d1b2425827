"""Direct effects between the nodes of one prompt's local replacement model.

Nodes: token embeddings (one per position), active features (activation > 0 at a layer and position), error nodes
(per layer and position: the MLP output the transcoder misses; at a layer without a transcoder, the whole MLP
output), and the top output logits. The direct effect of a source on a target is the source's write (embedding
vector; activation x decoder vector, for a CLT feature one into each MLP output at or after its layer, summed over
the ones before the target; error vector) pushed through the frozen linear residual path
(frozen.replacement_forward) to the target: a feature's pre-activation (its encoder direction at its layer and
position) or a logit minus the mean logit at the last position. Targets are taken in batches of nearby positions
of one layer; each batch runs the frozen model on the prompt's prefix up to its last position and up to its layer,
then one backward pass batched over its targets (one-hot seeds, `is_grads_batched`) yields the gradient at every
write point [n_targets, P, D], dotted with the sources' write vectors. Only rows of visited targets are kept, over
the columns of every source: memory is (visited targets) x (active features + errors + tokens), never latents x
positions squared. When more features are active than `max_feature_nodes`, targets are visited in order of their
estimated influence on the logits (recomputed as rows arrive), as circuit-tracer does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.circuits.frozen import CleanPass, prefix, replacement_forward


@dataclass
class Attribution:
    feat_layer: torch.Tensor     # [F] every active feature: layer, position, latent index, activation
    feat_pos: torch.Tensor
    feat_idx: torch.Tensor
    feat_act: torch.Tensor
    visited: torch.Tensor        # [Fv] indices into the F features whose rows were computed, sorted
    logit_ids: torch.Tensor      # [K]
    logit_probs: torch.Tensor    # [K]
    adjacency: torch.Tensor      # [N, N], rows = targets, columns = sources, over nodes ordered as
                                 # visited features, errors (layer-major, n_layers x T), tokens (T), logits (K)
    error_vectors: torch.Tensor  # [n_layers, T, D]
    n_layers: int
    T: int


def top_logits(logits_V: torch.Tensor, max_logits: int, coverage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable next tokens until their probability sums to `coverage` (at most max_logits)."""
    probs = logits_V.float().softmax(-1)
    p, ids = probs.sort(descending=True)
    k = int((p.cumsum(0) < coverage).sum()) + 1
    k = max(1, min(k, max_logits))
    return ids[:k], p[:k]


class _Sources:
    """The write vectors of every source, and how to turn gradients at the write points into their columns.
    The features of a source layer are laid out per position, padded to the most active features at one
    position ([T, kmax]), so each position's effects are one small matmul (no [targets x features x D] gather).
    The features' decoder vectors ([T, kmax, D] per (source, target) layer pair) are gathered once and held when
    they fit in `hold_bytes`; otherwise (a CLT over many layers: 2.2 GiB for SmolLM2's 30 layers and 465 pairs)
    each batch gathers them for its P positions."""

    def __init__(self, clean: CleanPass, adapter, feats: tuple, errors_LTD: torch.Tensor, hold_bytes: int):
        self.clean, self.adapter, self.errors = clean, adapter, errors_LTD
        self.layer, self.pos, self.idx, self.act = feats
        self.F, (self.n_layers, self.T, self.D) = self.layer.numel(), errors_LTD.shape
        self.n_cols = self.F + self.n_layers * self.T + self.T
        # per source layer: (layer, columns [T, kmax] (-1 = padding), latents [T, kmax], activations [T, kmax]
        # (0 in padding), the target layers its decoders write)
        self.by_layer = []
        for src in adapter.layers:
            sel = (self.layer == src).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            pos = self.pos[sel]
            counts = torch.bincount(pos, minlength=self.T)
            slot = torch.arange(sel.numel()) - (counts.cumsum(0) - counts)[pos]  # rank within its position
            shape = (self.T, int(counts.max()))
            cols = torch.full(shape, -1, dtype=torch.long)
            cols[pos, slot] = sel
            latents = torch.zeros(shape, dtype=torch.long)
            latents[pos, slot] = self.idx[sel]
            acts = torch.zeros(shape)
            acts[pos, slot] = self.act[sel]
            targets = [t for t in range(src, self.n_layers) if adapter.decoder_vectors(src, t, self.idx[sel[:1]])
                       is not None]
            self.by_layer.append((src, cols, latents, acts, targets))
        size = sum(4 * self.T * cols.shape[1] * self.D * len(targets) for _, cols, _, _, targets in self.by_layer)
        self.held = {}
        if size <= hold_bytes:
            for src, _, latents, _, targets in self.by_layer:
                for tgt in targets:
                    self.held[src, tgt] = self._gather(src, tgt, latents)

    def _gather(self, src: int, tgt: int, latents_PK: torch.Tensor) -> torch.Tensor:
        """Decoder vectors src -> tgt of the laid-out latents: [P, kmax, D]."""
        return self.adapter.decoder_vectors(src, tgt, latents_PK.reshape(-1)).view(*latents_PK.shape, self.D)

    def columns(self, grads: dict) -> torch.Tensor:
        """grads: write point ("E" or layer) -> [n, P, D] for the first P positions (missing = zero; later
        positions cannot reach the targets) -> direct effects [n, n_cols]."""
        n, P, _ = next(iter(grads.values())).shape
        out = torch.zeros(n, self.n_cols)
        for src, cols, latents, acts, targets in self.by_layer:
            acc = None
            for tgt in targets:
                if tgt in grads:
                    held = self.held.get((src, tgt))
                    dec_PKD = held[:P] if held is not None else self._gather(src, tgt, latents[:P])
                    e = torch.bmm(grads[tgt].transpose(0, 1), dec_PKD.transpose(1, 2))  # [P, n, kmax] per unit
                    acc = e if acc is None else acc.add_(e)
            if acc is not None:
                acc.mul_(acts[:P, None, :])  # x activation: the effect of the feature's whole write
                c = cols[:P]
                valid = c >= 0
                out[:, c[valid]] = acc.permute(1, 0, 2)[:, valid]
        for L in range(self.n_layers):
            if L in grads:
                start = self.F + L * self.T
                out[:, start:start + P] = (grads[L] * self.errors[L, :P]).sum(-1)
        if "E" in grads:
            start = self.F + self.n_layers * self.T
            out[:, start:start + P] = (grads["E"] * self.clean.embed_TD[:P]).sum(-1)
        return out


def _influence_order(rows: torch.Tensor, row_cols: torch.Tensor, n_logits: int, probs: torch.Tensor,
                     n_steps: int, chunk: int = 256) -> torch.Tensor:
    """Influence on the logits of every source column, through the rows computed so far (normalised |weights|):
    (w_0 + w_1 + ...) A, where w_0 holds the logits' probabilities and w_{t+1} = w_t A read at the columns of the
    rows' own features. The walk runs on the small square part A[:, row_cols]; the one product with every column
    is taken over row chunks, so no second [rows x columns] matrix (|rows|, 0.5 GiB at 2,048 rows) is made."""
    inv = torch.cat([r.abs().sum(1) for r in rows.split(chunk)]).clamp_min(1e-10).reciprocal()
    square = rows[:, row_cols].abs().mul_(inv[:, None])
    w = torch.zeros(rows.shape[0])
    w[:n_logits] = probs
    walked = torch.zeros_like(w)
    for _ in range(n_steps):
        walked += w
        w = torch.cat([torch.zeros(n_logits), w @ square])
        if not bool(w.any()):
            break
    total = torch.zeros(rows.shape[1])
    for a in range(0, rows.shape[0], chunk):
        total.addmv_(rows[a:a + chunk].abs().T, walked[a:a + chunk] * inv[a:a + chunk])
    return total


@torch.no_grad()
def active_features(adapter, clean: CleanPass, exclude_first: int = 0):
    """Every (layer, position, latent) with activation > 0, at positions >= exclude_first (the first
    `exclude_first` positions of a context were left out of training: their features are not nodes)."""
    layers, pos, idx, act = [], [], [], []
    for L in adapter.layers:
        a_TN = adapter.encode_layer(L, clean.mlp_in[L])
        p, i = (a_TN[exclude_first:] > 0).nonzero(as_tuple=True)
        p = p + exclude_first
        layers.append(torch.full_like(p, L)), pos.append(p), idx.append(i), act.append(a_TN[p, i])
    if not layers:
        return (torch.zeros(0, dtype=torch.long),) * 3 + (torch.zeros(0),)
    return torch.cat(layers), torch.cat(pos), torch.cat(idx), torch.cat(act).float()


def _skip_from(skip, first: int):
    """The skip term, zero at positions < first (there the MLP output is frozen whole)."""
    if skip is None or first == 0:
        return skip
    return lambda x: skip(x) * (torch.arange(x.shape[-2]) >= first)[:, None]


@torch.no_grad()
def frozen_mlps(adapter, clean: CleanPass, exclude_first: int = 0):
    """(constant MLP outputs, skip maps, error vectors [n_layers, T, D]). Covered layer: error = MLP output -
    the replacement's output there (the decodes of every source layer that writes into it, skip included);
    uncovered layer, and positions < exclude_first of every layer (the transcoders never trained there): the MLP
    output is frozen and is all error."""
    n_layers, first = len(clean.mlp_out), exclude_first
    acts = {L: adapter.encode_layer(L, clean.mlp_in[L]) for L in adapter.layers}
    const, skips, errors = [], [], []
    for L in range(n_layers):
        y, x = clean.mlp_out[L], clean.mlp_in[L]
        if L not in adapter.layers:
            const.append(y), skips.append(None), errors.append(y)
            continue
        skip = _skip_from(adapter.skip(L), first)
        recon = adapter.decode_to(L, acts) + (skip(x) if skip is not None else 0)
        err = y - recon
        err[:first] = y[:first]
        const.append(y - skip(x) if skip is not None else y), skips.append(skip), errors.append(err)
    return const, skips, torch.stack(errors)


def attribute(model, clean: CleanPass, adapter, max_feature_nodes: int = 2048, max_logits: int = 10,
              logit_coverage: float = 0.95, batch_size: int = 32, must_visit: torch.Tensor | None = None,
              hold_bytes: int = 2**30, exclude_first: int = 0) -> Attribution:
    T, D = clean.embed_TD.shape
    n_layers = len(clean.mlp_out)
    feats = active_features(adapter, clean, exclude_first)
    const, skips, errors = frozen_mlps(adapter, clean, exclude_first)
    src = _Sources(clean, adapter, feats, errors, hold_bytes)
    logit_ids, logit_probs = top_logits(clean.logits_TV[-1], max_logits, logit_coverage)
    K, F = logit_ids.numel(), src.F

    enc_by_layer = {L: adapter.encoder_vectors(L, src.idx[src.layer == L]) for L in adapter.layers}
    first_of_layer = {L: int((src.layer < L).sum()) for L in adapter.layers}

    def rows_for(layer: int | None, targets: torch.Tensor) -> torch.Tensor:
        """Rows of logit targets (layer None: indices into logit_ids) or of features of one layer (indices into
        the F features), in batches of nearby positions: a batch runs the frozen model on the prefix up to its last
        position and up to its layer only (nothing later can reach it)."""
        pos = torch.full_like(targets, T - 1) if layer is None else src.pos[targets]
        order = pos.argsort(stable=True)
        out = torch.zeros(targets.numel(), src.n_cols)
        for a in range(0, targets.numel(), batch_size):
            b = order[a:a + batch_size]
            P = int(pos[b].max()) + 1
            keys = ["E"] + list(range(n_layers if layer is None else layer))
            writes = {k: torch.zeros(P, D, requires_grad=True) for k in keys}
            with torch.enable_grad():
                xs, logits = replacement_forward(model, prefix(clean, P), [c[:P] for c in const], skips, writes,
                                                 upto=layer)
                if layer is None:
                    y = logits[-1, logit_ids[targets[b]]] - logits[-1].mean()
                else:
                    enc = enc_by_layer[layer][targets[b] - first_of_layer[layer]]
                    y = (xs[layer][pos[b]] * enc).sum(-1)
                g = torch.autograd.grad(y, [writes[k] for k in keys], torch.eye(b.numel()), is_grads_batched=True)
            out[b] = src.columns(dict(zip(keys, g)))
        return out

    budget = min(max_feature_nodes, F)
    rows = torch.zeros(K + budget, src.n_cols)
    rows[:K] = rows_for(None, torch.arange(K))
    visited = torch.zeros(F, dtype=torch.bool)
    order: list[int] = []
    first = must_visit if must_visit is not None else torch.zeros(0, dtype=torch.long)
    while len(order) < budget:
        if len(order) == 0 and first.numel():
            pick = first[:budget]
        elif F <= max_feature_nodes:
            pick = (~visited).nonzero().squeeze(1)
        else:
            infl = _influence_order(rows[:K + len(order)], torch.tensor(order, dtype=torch.long), K, logit_probs,
                                    n_layers + 2)[:F]
            infl[visited] = -1.0
            step = min(budget - len(order), max(256, len(order)))
            pick = infl.topk(step).indices
        for L in sorted({int(v) for v in src.layer[pick]}):
            mine = pick[src.layer[pick] == L]
            start = K + len(order)
            rows[start:start + mine.numel()] = rows_for(L, mine)
            order += mine.tolist()
            visited[mine] = True
    order_t = torch.tensor(order, dtype=torch.long)
    keep = order_t.argsort()  # node order: features sorted by (layer, position, latent) as they were found
    visited_sorted = order_t[keep]
    # square adjacency over the graph's nodes; unvisited features are not nodes (their columns are dropped first,
    # so no second copy of the [rows x all features] matrix is made)
    n_err, N = n_layers * T, len(order) + n_layers * T + T + K
    col_of_node = torch.cat([visited_sorted, torch.arange(F, F + n_err + T)])
    node_cols = rows[:K + len(order), col_of_node]
    del rows
    adj = torch.zeros(N, N)
    adj[:len(order), :len(order) + n_err + T] = node_cols[K:][keep]
    adj[N - K:, :len(order) + n_err + T] = node_cols[:K]
    return Attribution(*feats, visited=visited_sorted, logit_ids=logit_ids, logit_probs=logit_probs,
                       adjacency=adj, error_vectors=errors, n_layers=n_layers, T=T)
