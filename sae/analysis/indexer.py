"""Streaming per-feature statistics of one SAE: what `strata analyze` stores for every feature.

A `Block` is a run of consecutive tokens with `margin` extra tokens on each side; only the core rows are
counted, the margins exist so that the token window around any core token is inside the block. Each block
is encoded once on the SAE's device, the codes are made sparse (TopK SAEs have k non-zeros per row), and
every statistic is updated from the sparse entries:
  counts, sums, sums of squares, maxima (per feature, and per layer for multi-layer SAEs),
  a 50-bin histogram (histogram.py), the top-k activations and a random sample of firings (topk.py).
When an entry enters a top-k, its window's activations are gathered from the dense codes still in hand,
so contexts need no second pass. Memory: O(features x (k + sample) x window), never tokens x features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.analysis.histogram import RunningHistogram
from sae.analysis.running_top import RunningTopK


@dataclass
class Block:
    start: int  # global row of acts row 0
    core: tuple[int, int]  # rows [lo, hi) of this block that are counted
    acts: dict  # key -> Tensor [rows, d] on the analysis device
    token_ids: torch.Tensor  # int32 [rows]
    doc_ids: torch.Tensor  # int64 [rows]
    context_ids: torch.Tensor  # int64 [rows]: which model context (forward pass) each row came from


@dataclass
class IndexerSettings:
    top_k: int = 20
    window: int = 5  # tokens each side of the peak
    sample_size: int = 50  # random firings kept, later split into quantile intervals
    intervals: int = 5  # quantile intervals shown per feature
    per_interval: int = 5  # examples shown per interval
    hist_bins: int = 50
    negatives: int = 128  # random contexts kept for scoring explanations
    seed: int = 0
    context: int = 0  # tokens per model context (0 = unknown)
    exclude_first: int = 0  # first positions of each context the SAEs were not trained on: never counted as firing


class SaeIndexer:
    """Accumulates the statistics of one SAE. `slots` lists the key groups encoded separately:
    one group per layer for a multi-layer SAE, one group (all in_keys, concatenated) otherwise."""

    def __init__(self, sae, slots: list[list[str]], settings: IndexerSettings, device):
        self.sae, self.slots, self.s = sae, slots, settings
        self.n = int(sae.cfg.n_latents)
        self.device = device
        n, L, W = self.n, len(slots), 2 * settings.window + 1
        self.count = torch.zeros((n, L), dtype=torch.long, device=device)
        self.sum = torch.zeros((n, L), dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(n, dtype=torch.float64, device=device)
        self.max = torch.zeros(n, device=device)
        self.vectors = 0  # (token, slot) vectors encoded
        self.hist = RunningHistogram(n, settings.hist_bins, device)
        window = {"acts": ((W,), torch.float32), "tokens": ((W,), torch.int32)}
        self.top = RunningTopK(n, settings.top_k, window, device)
        self.sample = RunningTopK(n, settings.sample_size, window, device)
        self.neg = RunningTopK(1, settings.negatives, {"tokens": ((W,), torch.int32), "codes": ((n,), torch.float16)}, device)
        self.gen = torch.Generator(device=device).manual_seed(settings.seed)

    @torch.no_grad()
    def encode(self, block: Block, slot: int) -> torch.Tensor:
        keys = self.slots[slot]
        x = torch.cat([block.acts[k] for k in keys], dim=1)
        # one key: pass it, so a multi-layer SAE applies that layer's normalisation
        codes = (self.sae.encode(x, key=keys[0]) if len(keys) == 1 else self.sae.encode(x)).float()
        if self.s.exclude_first and self.s.context:
            rows = block.start + torch.arange(len(codes), device=codes.device)
            codes[rows - block.context_ids * self.s.context < self.s.exclude_first] = 0
        return codes

    def _window(self, block: Block, codes: torch.Tensor, rows: torch.Tensor, feats: torch.Tensor | None):
        """Activations (of `feats`, or all codes) and token ids in the window around block rows `rows`."""
        N = self.s.window
        wr = rows.unsqueeze(1) + torch.arange(-N, N + 1, device=rows.device)
        inside = (wr >= 0) & (wr < len(block.token_ids))
        wr = wr.clamp(0, len(block.token_ids) - 1)
        same = inside & (block.doc_ids[wr] == block.doc_ids[rows].unsqueeze(1)) \
            & (block.context_ids[wr] == block.context_ids[rows].unsqueeze(1))
        tokens = torch.where(same, block.token_ids[wr], torch.full_like(block.token_ids[wr], -1))
        if feats is None:
            return None, tokens
        acts = torch.where(same, codes[wr, feats.unsqueeze(1)], torch.zeros((), device=codes.device))
        return acts, tokens

    @torch.no_grad()
    def update(self, block: Block) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Count one block; return per slot the sparse codes of the core rows (row - lo, feature, value)."""
        lo, hi = block.core
        L = len(self.slots)
        # a few random rows per block become candidate negatives for explanation scoring; their codes are
        # the maximum over slots (silent at every layer)
        neg_rows = lo + torch.randperm(hi - lo, generator=self.gen, device=self.device)[:min(16, hi - lo)]
        neg_codes = None
        sparse = []
        for slot in range(L):
            codes = self.encode(block, slot)
            neg_codes = codes[neg_rows] if neg_codes is None else torch.maximum(neg_codes, codes[neg_rows])
            r, j = codes[lo:hi].nonzero(as_tuple=True)
            v = codes[lo + r, j]
            sparse.append((r, j, v))
            self.vectors += hi - lo
            self.count[:, slot] += torch.bincount(j, minlength=self.n)
            self.sum[:, slot] += torch.bincount(j, weights=v.double(), minlength=self.n)
            self.sumsq += torch.bincount(j, weights=v.double() ** 2, minlength=self.n)
            self.max.scatter_reduce_(0, j, v, reduce="amax", include_self=True)
            self.hist.add(j, v)
            if len(j) == 0:
                continue
            rows = lo + r
            ids = (block.start + rows) * L + slot

            def payload(sel, rows=rows, j=j, codes=codes):
                acts, tokens = self._window(block, codes, rows[sel], j[sel])
                return {"acts": acts, "tokens": tokens}

            self.top.push(j, v, v, ids, payload)
            prio = torch.rand(len(j), generator=self.gen, device=self.device)
            self.sample.push(j, prio, v, ids, payload)
        self._sample_negatives(block, neg_rows, neg_codes)
        return sparse

    def _sample_negatives(self, block: Block, rows: torch.Tensor, codes: torch.Tensor) -> None:
        m = len(rows)
        prio = torch.rand(m, generator=self.gen, device=self.device)
        feat = torch.zeros(m, dtype=torch.long, device=self.device)

        def payload(sel):
            _, tokens = self._window(block, None, rows[sel], None)
            return {"tokens": tokens, "codes": codes[sel].half()}

        self.neg.push(feat, prio, prio, block.start + rows, payload)

    def finalize(self) -> dict:
        """Everything per feature as CPU tensors (ids of examples decoded to row and slot)."""
        L = len(self.slots)
        count = self.count.sum(1)
        total = self.sum.sum(1)
        out = {
            "count": count,
            "frequency": count.double() / max(1, self.vectors),
            "mean_act": torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)),
            "max_act": self.max,
            "sum": total,
            "sumsq": self.sumsq,
            "hist_counts": self.hist.counts,
            "hist_hi": self.hist.hi,
            "layer_count": self.count,
            "layer_sum": self.sum,
            "vectors": self.vectors,
        }
        top = self.top.sorted_by_value()
        out.update({f"top_{k}": v for k, v in top.items()})
        out.update(quantile_samples(self.sample.sorted_by_value(), intervals=self.s.intervals, per_interval=self.s.per_interval))
        for prefix in ("top_", "sample_"):
            ids = out.pop(prefix + "id")
            out[prefix + "row"] = torch.where(ids >= 0, ids // L, ids)
            out[prefix + "slot"] = torch.where(ids >= 0, ids % L, ids)
        neg = self.neg.sorted_by_value()
        valid = neg["id"][0] >= 0
        out["neg_tokens"] = neg["tokens"][0][valid]
        out["neg_codes"] = neg["codes"][0][valid]
        return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in out.items()}


def quantile_samples(sample: dict, intervals: int, per_interval: int) -> dict:
    """Split each feature's random sample of firings (sorted by value, descending) into `intervals`
    equal-count groups (quantile intervals of the activation distribution) and keep `per_interval`
    evenly spaced examples of each. Returns sample_* fields [n, intervals * per_interval] and
    sample_interval (0 = highest interval, -1 = empty slot)."""
    value, ids = sample["value"], sample["id"]
    n, S = value.shape
    filled = (ids >= 0).sum(1)  # [n]
    out_slots = intervals * per_interval
    q = torch.arange(intervals, device=value.device).repeat_interleave(per_interval)
    p = torch.arange(per_interval, device=value.device).repeat(intervals)
    # position inside the filled prefix: interval q spans [q*f/I, (q+1)*f/I); take evenly spaced members
    f = filled.unsqueeze(1).double()
    lo = torch.floor(q * f / intervals)
    hi = torch.floor((q + 1) * f / intervals)
    width = hi - lo
    pos = lo + torch.floor((p + 0.5) * width / per_interval)
    ok = (p < width) & (pos < f)
    pos = pos.long().clamp(0, S - 1)
    out = {}
    for name, t in sample.items():
        idx = pos.reshape(n, out_slots, *([1] * (t.dim() - 2))).expand(n, out_slots, *t.shape[2:])
        g = torch.gather(t, 1, idx)
        mask = ok.reshape(n, out_slots, *([1] * (t.dim() - 2)))
        fill = -1 if name in ("id", "tokens") else 0
        out["sample_" + name] = torch.where(mask, g, torch.full_like(g, fill))
    out["sample_interval"] = torch.where(ok, q.expand(n, out_slots), torch.full((n, out_slots), -1, device=value.device))
    return out
