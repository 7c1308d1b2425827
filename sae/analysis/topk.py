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
    """Best k entries per feature by score, each with value, id (global row * n_slots + slot) and payload."""

    def __init__(self, n: int, k: int, payload_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device):
        self.n, self.k = n, k
        self.score = torch.full((n, k), -float("inf"), device=device)
        self.value = torch.zeros((n, k), device=device)
        self.id = torch.full((n, k), -1, dtype=torch.long, device=device)
        self.payload = {name: torch.zeros((n, k, *shape), dtype=dt, device=device)
                        for name, (shape, dt) in payload_shapes.items()}

    def threshold(self, feat: torch.Tensor) -> torch.Tensor:
        return self.score[feat, -1]

    def push(self, feat, score, value, ids, make_payload) -> None:
        """Offer entries; `make_payload(index_tensor)` returns {name: tensor [m, *shape]} for the kept ones."""
        keep = score > self.threshold(feat)
        if not bool(keep.any()):
            return
        sel = keep.nonzero().squeeze(1)
        order, rank = rank_within_feature(feat[sel], score[sel])
        sel = sel[order][rank < self.k]
        rank = rank[rank < self.k]
        f = feat[sel]
        payload = make_payload(sel)

        touched, slot_of = torch.unique(f, return_inverse=True)
        m = len(touched)
        dev = self.score.device
        c_score = torch.full((m, self.k), -float("inf"), device=dev)
        c_score[slot_of, rank] = score[sel].float()
        c_value = torch.zeros((m, self.k), device=dev)
        c_value[slot_of, rank] = value[sel].float()
        c_id = torch.full((m, self.k), -1, dtype=torch.long, device=dev)
        c_id[slot_of, rank] = ids[sel]

        all_score = torch.cat([self.score[touched], c_score], 1)
        best = torch.topk(all_score, self.k, dim=1).indices  # [m, k] positions in the 2k candidates
        self.score[touched] = torch.gather(all_score, 1, best)
        self.value[touched] = torch.gather(torch.cat([self.value[touched], c_value], 1), 1, best)
        self.id[touched] = torch.gather(torch.cat([self.id[touched], c_id], 1), 1, best)
        for name, buf in self.payload.items():
            c = torch.zeros((m, self.k, *buf.shape[2:]), dtype=buf.dtype, device=dev)
            c[slot_of, rank] = payload[name].to(buf.dtype)
            both = torch.cat([buf[touched], c], 1)
            idx = best.reshape(m, self.k, *([1] * (buf.dim() - 2))).expand(m, self.k, *buf.shape[2:])
            buf[touched] = torch.gather(both, 1, idx)

    def sorted_by_value(self) -> dict[str, torch.Tensor]:
        """All fields with each feature's entries sorted by value (descending); empty slots last (id -1)."""
        key = torch.where(self.id >= 0, self.value, torch.full_like(self.value, -float("inf")))
        order = torch.argsort(key, dim=1, descending=True, stable=True)
        out = {"value": torch.gather(self.value, 1, order), "id": torch.gather(self.id, 1, order)}
        for name, buf in self.payload.items():
            idx = order.reshape(*order.shape, *([1] * (buf.dim() - 2))).expand_as(buf)
            out[name] = torch.gather(buf, 1, idx)
        return out
