"""Per-feature running top-k over a stream of sparse (feature, score) entries, with a payload per entry.

Memory is [n_features, k] whatever the stream length. Each batch: drop entries that cannot beat the
feature's current k-th score, keep at most k per feature, then merge them into the rows of the touched
features only (one torch.topk over [touched, 2k]). The payload (token window and its activations) is
computed by the caller only for entries that pass the first two filters, so the expensive part scales
with the number of improvements, not with the number of entries.

The same class keeps a uniform random sample of firings (reservoir sampling by random priority): pass a
uniform random number as the score and the activation as the value.
"""
from __future__ import annotations

import torch


def rank_within_feature(feat: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order entries by (feature, score descending); return the order and each entry's rank in its feature."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(feat[order], stable=True)]
    f = feat[order]
    n = len(f)
    if n == 0:
        return order, torch.zeros(0, dtype=torch.long, device=feat.device)
    is_start = torch.ones(n, dtype=torch.bool, device=feat.device)
    is_start[1:] = f[1:] != f[:-1]
    start_pos = torch.arange(n, device=feat.device)
    start_pos = torch.where(is_start, start_pos, torch.zeros_like(start_pos))
    start_pos = torch.cummax(start_pos, 0).values
    return order, torch.arange(n, device=feat.device) - start_pos


class RunningTopK:
    """Best k entries per feature by score, each with value, id (global row * n_slots + slot) and payload.

    Slots are unordered: a new winner takes the slot of an entry it evicts, so only winners are written
    (payload buffers are never shifted or gathered whole); `sorted_by_value` orders them at the end."""

    def __init__(self, n: int, k: int, payload_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device):
        self.n, self.k = n, k
        self.score = torch.full((n, k), -float("inf"), device=device)
        self.min_score = torch.full((n,), -float("inf"), device=device)  # the entry a newcomer must beat
        self.value = torch.zeros((n, k), device=device)
        self.id = torch.full((n, k), -1, dtype=torch.long, device=device)
        self.payload = {name: torch.zeros((n, k, *shape), dtype=dt, device=device)
                        for name, (shape, dt) in payload_shapes.items()}

    def push(self, feat, score, value, ids, make_payload) -> None:
        """Offer entries; `make_payload(index_tensor)` returns {name: tensor [m, *shape]} for the winners."""
        keep = score > self.min_score[feat]
        if not bool(keep.any()):
            return
        sel = keep.nonzero().squeeze(1)
        order, rank = rank_within_feature(feat[sel], score[sel])
        sel = sel[order][rank < self.k]
        rank = rank[rank < self.k]
        f = feat[sel]
        dev = self.score.device
        starts = torch.ones(len(f), dtype=torch.bool, device=dev)
        starts[1:] = f[1:] != f[:-1]
        touched = f[starts]  # sorted by feature, so runs of equal features are contiguous
        slot_of = torch.cumsum(starts.long(), 0) - 1
        m, k = len(touched), self.k

        c_score = torch.full((m, k), -float("inf"), device=dev)
        c_score[slot_of, rank] = score[sel].float()
        old = self.score[touched]
        top = torch.topk(torch.cat([old, c_score], 1), k, dim=1)
        self.min_score[touched] = top.values[:, -1]
        # winners among the candidates (position >= k), and the old slots they free
        is_new = (top.indices >= k) & (top.values > -float("inf"))  # (empty candidate slots tie with empty old ones)
        n_new = is_new.sum(1)
        kept_old = torch.zeros((m, k + 1), dtype=torch.bool, device=dev)  # column k catches the newcomers
        kept_old.scatter_(1, top.indices.clamp(max=k), True)
        freed = torch.argsort(kept_old[:, :k].to(torch.int8), dim=1, stable=True)  # freed slots first
        new_pos = torch.sort(torch.where(is_new, top.indices - k, torch.full_like(top.indices, k)), dim=1).values
        use = torch.arange(k, device=dev).unsqueeze(0) < n_new.unsqueeze(1)
        r, j = use.nonzero(as_tuple=True)
        rows, slots, cand_rank = touched[r], freed[r, j], new_pos[r, j]
        # candidate (row r, rank) -> its entry in `sel`
        first = starts.nonzero().squeeze(1)  # where each touched feature's candidates begin
        entry = sel[first[r] + cand_rank]
        self.score[rows, slots] = score[entry].float()
        self.value[rows, slots] = value[entry].float()
        self.id[rows, slots] = ids[entry]
        payload = make_payload(entry)
        for name, buf in self.payload.items():
            buf[rows, slots] = payload[name].to(buf.dtype)

    def sorted_by_value(self) -> dict[str, torch.Tensor]:
        """All fields with each feature's entries sorted by value (descending); empty slots last (id -1)."""
        key = torch.where(self.id >= 0, self.value, torch.full_like(self.value, -float("inf")))
        order = torch.argsort(key, dim=1, descending=True, stable=True)
        out = {"value": torch.gather(self.value, 1, order), "id": torch.gather(self.id, 1, order)}
        for name, buf in self.payload.items():
            idx = order.reshape(*order.shape, *([1] * (buf.dim() - 2))).expand_as(buf)
            out[name] = torch.gather(buf, 1, idx)
        return out
