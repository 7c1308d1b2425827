"""The causal check of a match: does removing an upstream feature remove the downstream one?

For a matched pair (SAE A writing at key a, SAE B reading at key b, b downstream of a) and each upstream
feature i with its downstream candidates j (decoder cosine, see stream.py):

    effect(i, j) = sum_p [b_j(x_b(p)) - b_j(x_b'(p))] / sum_p b_j(x_b(p))

over positions p where i fires (on the contexts measured), where x_b' is what the model computes at b after
a_i(p) * W_dec_A[i] (i's decoder contribution, raw units) is subtracted from the activation at a, at p. 1 =
j vanishes without i, 0 = j does not care, negative = j grows; 0 where j never fired on those positions; NaN
where i was never ablated. The drop is read at the same token (an effect that attention carries to later
tokens is not counted).

What computes x_b from x_a (a `span`): `ModelSpan` runs the run's own model from a to b on whole contexts,
the stored activation at a spliced in (blocks before a resid key are skipped); `LinearSpan` applies a linear
map position by position: a synthetic run's known map between resid layers (`truth_span`), a linear toy. The
clean x_b goes through the same span, so a zero ablation has exactly zero effect.

Cost, and what is batched: ablating one feature per forward pass would cost a forward per firing. Instead
each *round* ablates, at every position, one of the upstream features active there (the one measured fewest
times so far; the strongest activation breaks ties), all in one forward over the batch of contexts, and
reads every position's own drop. A round thus measures one firing per token for the price of one forward,
and `rounds` rounds spread the measurements over the features (rare features are ablated wherever they
fire; frequent ones on a sample of their firings). The contexts (a budget of tokens) are chosen to hold
firings of as many upstream features as possible (`choose_contexts`, from the analysis pass's top and
sampled firings). Positions share a context, so an ablation at an earlier
position can reach a later one through attention: that cross-talk (zero for a position-wise span) is the
price of a cost of (1 + rounds) span forwards per token (measured in scripts/bench_dashboard.py).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from activations.hooks import blocks, capture, splice, split_key


def read_key(sae) -> str:
    return sae.cfg.in_keys[0]


def write_key(sae) -> str:
    return sae.cfg.out_keys[0]


class LinearSpan:
    """x_b = x_a @ M + bias at every position (no mixing between tokens)."""

    def __init__(self, M_dd: torch.Tensor, bias_d: torch.Tensor | None = None):
        self.M_dd, self.bias_d = M_dd.float(), None if bias_d is None else bias_d.float()

    def __call__(self, ids_CT, x_CTd: torch.Tensor) -> torch.Tensor:
        y = x_CTd @ self.M_dd.to(x_CTd.device)
        return y if self.bias_d is None else y + self.bias_d.to(x_CTd.device)


def truth_span(truth, a: str, b: str) -> LinearSpan | None:
    """A synthetic run's (`strata synth`) known map from resid.A to resid.B, or None for other keys: per layer,
    x -> coefficients of the live features (pseudo-inverse of their directions) -> each parent's coefficient
    to its children (lineage edges: persist, rotate, split, merge) -> the children's directions. Exact when
    the live features are at most d_model and independent; a least-norm reading of them otherwise."""
    (sa, la), (sb, lb) = split_key(a), split_key(b)
    if sa != "resid" or sb != "resid" or lb <= la:
        return None
    lin = truth.lineage
    M = torch.eye(lin.d_model, dtype=torch.float64)
    for L in range(la + 1, lb + 1):
        prev, live = lin.live_ids(L - 1), lin.live_ids(L)
        at_prev, at = {int(f): r for r, f in enumerate(prev)}, {int(f): r for r, f in enumerate(live)}
        T = torch.zeros((len(prev), len(live)), dtype=torch.float64)
        for p, c in lin.links(L):
            T[at_prev[p], at[c]] = 1.0
        D_prev = torch.from_numpy(lin.directions[L - 1][prev]).double()
        D = torch.from_numpy(lin.directions[L][live]).double()
        M = M @ torch.linalg.pinv(D_prev) @ T @ D
    return LinearSpan(M.float())


class _Passthrough(nn.Module):
    """Stands in for a block before the spliced key: returns its input in the form the real block returns."""

    def __init__(self, tuple_out: bool):
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, hidden_states=None, *args, **kwargs):
        return (hidden_states,) if self.tuple_out else hidden_states


class ModelSpan:
    """The model's computation from key `a` to key `b` on whole contexts: the activation at `a` is replaced by
    the given one, the blocks before `a`'s block are skipped, the pass stops once `b` is reached."""

    def __init__(self, model: nn.Module, a: str, b: str):
        self.model, self.a, self.b = model, a, b
        site, layer = split_key(a)
        # blocks before resid.L's block are skipped; an attn_out/mlp_out key also needs the residual stream
        # entering its block, so the model computes everything before it from the tokens
        self.first = layer if site == "resid" else 0
        bl = blocks(model)
        seen = {}

        def probe(module, inputs, output):
            seen["tuple"] = isinstance(output, tuple)  # returns None: the output is left alone

        handle = bl[0].register_forward_hook(probe)
        try:
            capture(model, ["resid.1"], torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device))
        finally:
            handle.remove()
        self.skip = _Passthrough(seen.get("tuple", False))

    @torch.no_grad()
    def __call__(self, ids_CT: torch.Tensor, x_CTd: torch.Tensor) -> torch.Tensor:
        bl = blocks(self.model)
        real = [bl[i] for i in range(self.first)]
        try:
            for i in range(self.first):
                bl[i] = self.skip
            with splice(self.model, self.a, lambda act: x_CTd.to(act.dtype).reshape(act.shape)):
                out = capture(self.model, [self.b], ids_CT.to(torch.long))[self.b]
        finally:
            for i, m in enumerate(real):
                bl[i] = m
        return out.float()


def context_starts(spans: list[tuple[int, int]], T: int) -> list[int]:
    """First rows of the whole model contexts (T rows each, aligned to row 0) inside the spans."""
    return [s for a, b in spans for s in range(a + (-a) % T, b - T + 1, T)]


def choose_contexts(starts: list[int], firing_rows: torch.Tensor, T: int, n: int) -> list[int]:
    """At most n of the contexts `starts`, chosen greedily to hold firings of as many upstream features as
    possible (firing_rows [n_up, s]: rows where each feature fired, -1 = none, e.g. the analysis pass's top
    and sampled rows), so that a small token budget still ablates most features. Sorted by row."""
    if len(starts) <= n:
        return list(starts)
    ctx_ids = np.asarray(starts, dtype=np.int64) // T
    order = np.argsort(ctx_ids)
    rows = firing_rows.cpu().numpy().astype(np.int64)
    pos = np.clip(np.searchsorted(ctx_ids[order], rows // T), 0, len(order) - 1)
    ctx = np.where((rows >= 0) & (ctx_ids[order][pos] == rows // T), order[pos], -1)  # [n_up, s]: which context
    holds = np.zeros((len(starts), len(ctx)), dtype=bool)  # context x feature: a firing of it lies there
    f, s = np.nonzero(ctx >= 0)
    holds[ctx[f, s], f] = True
    chosen, covered = [], np.zeros(len(ctx), dtype=bool)
    for _ in range(n):
        gain = (holds & ~covered).sum(1)
        gain[chosen] = -1
        c = int(gain.argmax())
        chosen.append(c)
        covered |= holds[c]
    return sorted(starts[c] for c in chosen)


def context_batches(run, starts: list[int], keys: list[str], batch_contexts: int,
                    device) -> Iterator[tuple[torch.Tensor, dict]]:
    """The model contexts beginning at rows `starts`: (token ids [C, T], {key: acts [C, T, d]}) per batch."""
    T = int(run.manifest.context_length)
    for s in range(0, len(starts), batch_contexts):
        rows = np.concatenate([np.arange(r, r + T) for r in starts[s:s + batch_contexts]])
        ids = np.concatenate([run.read_tokens(r, r + T)["token_ids"] for r in starts[s:s + batch_contexts]])
        C = len(rows) // T
        acts = {k: torch.from_numpy(np.ascontiguousarray(run.read_rows(k, rows))).to(device, torch.float32)
                .reshape(C, T, -1) for k in keys}
        yield torch.from_numpy(ids.astype(np.int64)).reshape(C, T).to(device), acts


def pick_features(codes_Nn: torch.Tensor, measured_n: torch.Tensor) -> torch.Tensor:
    """Per row, the active feature measured fewest times (largest activation breaks ties); -1 if none fires."""
    active = codes_Nn > 0
    fewest = torch.where(active, -measured_n.float()[None], -torch.inf)
    top = fewest.max(1, keepdim=True).values
    pick = torch.where(active & (fewest == top), codes_Nn, -torch.inf).argmax(1)
    return torch.where(active.any(1), pick, -1)


class CausalScorer:
    """Accumulates drops of one pair over batches of contexts; `effect()` gives [n_up, m]."""

    def __init__(self, up, down, span, cand_idx: torch.Tensor, rounds: int = 2, exclude_first: int = 0):
        self.up, self.down, self.span, self.rounds, self.exclude_first = up, down, span, rounds, exclude_first
        self.cand = cand_idx.long()
        n, m = self.cand.shape
        self.drop = torch.zeros((n, m), dtype=torch.float64, device=self.cand.device)
        self.base = torch.zeros((n, m), dtype=torch.float64, device=self.cand.device)
        self.measured = torch.zeros(n, dtype=torch.long, device=self.cand.device)
        self.dec_nd = up.W_dec.detach().float() / up.out_scale(write_key(up))

    def _encode_down(self, x_CTd):
        return self.down.encode(x_CTd.reshape(-1, x_CTd.shape[-1]), key=read_key(self.down)).float()

    @torch.no_grad()
    def add(self, ids_CT: torch.Tensor, acts: dict) -> None:
        up, cand = self.up, self.cand.to(ids_CT.device)
        x_in = acts[read_key(up)]
        x_out = acts[write_key(up)]
        C, T, d = x_out.shape
        codes = up.encode(x_in.reshape(C * T, -1), key=read_key(up)).float()
        if self.exclude_first:
            codes.view(C, T, -1)[:, :self.exclude_first] = 0  # positions the SAEs never saw are not ablated
        clean = self._encode_down(self.span(ids_CT, x_out))
        for _ in range(self.rounds):
            pick = pick_features(codes, self.measured.to(codes.device))
            rows = torch.nonzero(pick >= 0).squeeze(1)
            if len(rows) == 0:
                break
            feat = pick[rows]
            delta = torch.zeros(C * T, d, device=x_out.device)
            delta[rows] = codes[rows, feat].unsqueeze(1) * self.dec_nd[feat].to(x_out.device)
            ablated = self._encode_down(self.span(ids_CT, x_out - delta.view(C, T, d)))
            cols = cand[feat]  # [r, m]
            before = torch.gather(clean[rows], 1, cols).double()
            after = torch.gather(ablated[rows], 1, cols).double()
            self.drop.index_add_(0, feat, before - after)
            self.base.index_add_(0, feat, before)
            self.measured += torch.bincount(feat, minlength=len(self.measured))
            codes[rows, feat] = 0  # the next round picks another of the features active at those positions

    def effect(self) -> torch.Tensor:
        eff = torch.where(self.base > 0, self.drop / self.base.clamp_min(1e-300), torch.zeros_like(self.drop))
        eff[self.measured == 0] = torch.nan
        return eff.float()


def causal_effects(up, down, span, batches, cand_idx: torch.Tensor, rounds: int = 2,
                   exclude_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(effect [n_up, m], times measured [n_up]) of one pair over `batches` of (ids, acts)."""
    scorer = CausalScorer(up, down, span, cand_idx, rounds, exclude_first)
    for ids, acts in batches:
        scorer.add(ids, acts)
    return scorer.effect(), scorer.measured
