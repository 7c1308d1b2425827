"""Interventions on one prompt's frozen linearised replacement model, and the effects the graph predicts for them.

`scale_feature` multiplies one active feature's activation by `factor` (0 zeroes it) in the replacement model of
frozen.py (attention patterns, norm denominators and error nodes fixed at the clean pass): it adds
(factor - 1) x activation x decoder vector at the feature's position into every MLP output the feature writes
(one for a transcoder feature, each covered layer >= its own for a CLT feature). With `respond=False` every other
feature keeps its clean activation, so a centred logit (logit minus the mean logit, the graph's logit node) moves
by (factor - 1) x the graph's direct edge feature -> logit. With `respond=True` every other active feature follows
its pre-activation one for one, layer by layer (the slope of TopK, BatchTopK, JumpReLU and ReLU inside their active
set; inactive features stay off), so the logit moves by (factor - 1) x `total_effects`: the sum over all paths
through features of the products of their edges, each edge into a feature divided by that feature's activation
(an edge is activation x effect per unit, and a responding feature passes on its change per unit). Every active
feature responds, so the two agree when every active feature is a graph node (`--max-feature-nodes` at least the
number of active features).
"""
from __future__ import annotations

import torch

from sae.circuits.attribute import Attribution, frozen_mlps
from sae.circuits.frozen import CleanPass, replacement_forward


def _add_writes(writes: dict, adapter, src: int, pos: torch.Tensor, idx: torch.Tensor, amount: torch.Tensor,
                shape: tuple) -> None:
    """writes[tgt] += amount x decoder vector (src -> tgt) of latents idx at positions pos, for every target."""
    for tgt in adapter.layers:
        dec = adapter.decoder_vectors(src, tgt, idx) if tgt >= src else None
        if dec is not None:
            base = writes.get(tgt, torch.zeros(shape))
            writes[tgt] = base.index_add(0, pos, amount[:, None] * dec.to(base.dtype))


@torch.no_grad()
def scale_feature(model, clean: CleanPass, adapter, feats: tuple, f: int, factor: float,
                  respond: bool = False, exclude_first: int = 0) -> torch.Tensor:
    """Logits [T, V] of the frozen replacement model with active feature `f` (an index into `feats`, as
    attribute.active_features returns them) scaled by `factor`; `respond` lets later features follow (above).
    exclude_first: as the graph was attributed with (the MLP outputs of those positions stay frozen whole)."""
    layer, pos, idx, act = feats
    const, skips, _ = frozen_mlps(adapter, clean, exclude_first)
    shape = tuple(clean.embed_TD.shape)
    writes: dict = {}
    src = int(layer[f])
    _add_writes(writes, adapter, src, pos[f:f + 1], idx[f:f + 1], (factor - 1.0) * act[f:f + 1], shape)
    if respond:
        base_xs, _ = replacement_forward(model, clean, const, skips, {})
        for L in [L for L in adapter.layers if L > src]:
            sel = (layer == L).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            xs, _ = replacement_forward(model, clean, const, skips, writes, upto=L)
            enc = adapter.encoder_vectors(L, idx[sel])
            d_pre = ((xs[L][pos[sel]] - base_xs[L][pos[sel]]) * enc).sum(-1)
            _add_writes(writes, adapter, L, pos[sel], idx[sel], d_pre, shape)
    return replacement_forward(model, clean, const, skips, writes)[1]


def centred(logits_TV: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The graph's logit nodes: the last position's logits of `token_ids` minus its mean logit."""
    return logits_TV[-1, token_ids] - logits_TV[-1].mean()


def total_effects(att: Attribution) -> torch.Tensor:
    """[K, Fv]: the change of each top (centred) logit per unit of relative change of each visited feature when
    the later features respond, A_LF (I - D^-1 A_FF)^-1 with D the features' activations. Features are ordered by
    layer and an edge runs only to a later layer, so I - D^-1 A_FF is unit lower triangular."""
    Fv, K = att.visited.numel(), att.logit_ids.numel()
    a = att.adjacency.double()
    a_ff, a_lf = a[:Fv, :Fv], a[-K:, :Fv]
    m = a_ff / att.feat_act[att.visited].double()[:, None]
    eye = torch.eye(Fv, dtype=torch.float64)
    return torch.linalg.solve_triangular(eye - m, a_lf, upper=False, left=False).float()
