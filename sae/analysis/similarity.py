"""Similarities between features: decoder cosine (from weights) and activation correlation (streamed).

Activation correlation of a feature pair (i in SAE A, j in SAE B, same tokens) needs only running sums
x, y, xy, x^2, y^2. The per-feature sums come from the feature stats; this module adds the xy sums for a
fixed list of candidate pairs, from the sparse codes of each batch: every token pairs its active features
in A with its active features in B (k_A * k_B products per token for TopK SAEs), and the products whose
(i, j) is a candidate are summed. Nothing of size tokens x features is ever formed.
"""
from __future__ import annotations

import torch

MAX_PAIRS_PER_CHUNK = 1 << 22


def topk_cosine(w_a: torch.Tensor, w_b: torch.Tensor, k: int, exclude_self: bool = False, chunk: int = 1024):
    """For every row of w_a, the k rows of w_b with the highest cosine: (indices [n_a, k], cosines [n_a, k])."""
    a = torch.nn.functional.normalize(w_a.float(), dim=1)
    b = torch.nn.functional.normalize(w_b.float(), dim=1)
    k = min(k, len(b) - (1 if exclude_self else 0))
    idx_out, cos_out = [], []
    for s in range(0, len(a), chunk):
        sim = a[s:s + chunk] @ b.T
        if exclude_self:
            rows = torch.arange(s, min(s + chunk, len(a)), device=sim.device)
            sim[rows - s, rows] = -float("inf")
        top = torch.topk(sim, k, dim=1)
        idx_out.append(top.indices)
        cos_out.append(top.values)
    return torch.cat(idx_out), torch.cat(cos_out)


def _pairs_by_row(row_a, row_b, n_rows):
    """Index pairs (ea, eb) of entries of A and B that sit on the same row (rows sorted ascending in each)."""
    count_b = torch.bincount(row_b, minlength=n_rows)
    start_b = torch.cumsum(count_b, 0) - count_b
    per_a = count_b[row_a]
    total = int(per_a.sum())
    ea = torch.repeat_interleave(torch.arange(len(row_a), device=row_a.device), per_a, output_size=total)
    group_start = torch.repeat_interleave(torch.cumsum(per_a, 0) - per_a, per_a, output_size=total)
    eb = start_b[row_a[ea]] + (torch.arange(total, device=row_a.device) - group_start)
    return ea, eb


class PairCorrelation:
    """Running xy sums for candidate pairs (a_idx[p], b_idx[p]) between two SAEs with n_b latents."""

    def __init__(self, a_idx: torch.Tensor, b_idx: torch.Tensor, n_b: int):
        self.n_b = n_b
        keys = a_idx.long() * n_b + b_idx.long()
        self.keys, self.order = torch.sort(keys.flatten())
        self.shape = a_idx.shape
        self.xy = torch.zeros(len(self.keys), dtype=torch.float64, device=keys.device)

    def add(self, a: tuple, b: tuple, n_rows: int) -> None:
        """a, b: (rows, features, values) of the non-zero codes of one batch, rows ascending, rows < n_rows."""
        row_a, feat_a, val_a = a
        row_b, feat_b, val_b = b
        if len(row_a) == 0 or len(row_b) == 0:
            return
        # bound memory: split the rows so that each chunk forms at most MAX_PAIRS_PER_CHUNK products
        per_row = torch.bincount(row_a, minlength=n_rows) * torch.bincount(row_b, minlength=n_rows)
        cum = torch.cumsum(per_row, 0)
        bounds = [0]
        while bounds[-1] < n_rows:
            base = int(cum[bounds[-1] - 1]) if bounds[-1] > 0 else 0
            nxt = int(torch.searchsorted(cum, base + MAX_PAIRS_PER_CHUNK, right=True))
            bounds.append(min(n_rows, max(nxt, bounds[-1] + 1)))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            sa = slice(int(torch.searchsorted(row_a, lo)), int(torch.searchsorted(row_a, hi)))
            sb = slice(int(torch.searchsorted(row_b, lo)), int(torch.searchsorted(row_b, hi)))
            ea, eb = _pairs_by_row(row_a[sa] - lo, row_b[sb] - lo, hi - lo)
            if len(ea) == 0:
                continue
            key = feat_a[sa][ea] * self.n_b + feat_b[sb][eb]
            pos = torch.searchsorted(self.keys, key).clamp(max=len(self.keys) - 1)
            hit = self.keys[pos] == key
            prod = val_a[sa][ea][hit].double() * val_b[sb][eb][hit].double()
            self.xy.index_add_(0, pos[hit], prod)

    def xy_sums(self) -> torch.Tensor:
        """xy sums in the shape of the candidate arrays."""
        out = torch.empty_like(self.xy)
        out[self.order] = self.xy
        return out.view(self.shape)


def correlation(n, sum_x, sum_xx, sum_y, sum_yy, sum_xy):
    """Pearson correlation from running sums over n samples (0 where a variance is 0)."""
    cov = n * sum_xy - sum_x * sum_y
    var = (n * sum_xx - sum_x ** 2).clamp(min=0) * (n * sum_yy - sum_y ** 2).clamp(min=0)
    return torch.where(var > 0, cov / var.clamp(min=1e-300).sqrt(), torch.zeros_like(cov))


class ResidualSimilarity:
    """Mean cosine between a token's centred residual vectors at two layers (centres from the first batch)."""

    def __init__(self):
        self.centre: dict[str, torch.Tensor] = {}
        self.sums: dict[tuple[str, str], list[float]] = {}

    def add(self, pairs: list[tuple[str, str]], acts: dict[str, torch.Tensor]) -> None:
        for key in {k for p in pairs for k in p}:
            if key not in self.centre:
                self.centre[key] = acts[key].float().mean(0)
        for a, b in pairs:
            xa, xb = acts[a].float(), acts[b].float()
            c = torch.nn.functional.cosine_similarity(xa - self.centre[a], xb - self.centre[b], dim=1)
            r = torch.nn.functional.cosine_similarity(xa, xb, dim=1)
            s = self.sums.setdefault((a, b), [0.0, 0.0, 0])
            s[0] += float(c.sum())
            s[1] += float(r.sum())
            s[2] += len(c)

    def result(self) -> list[dict]:
        return [{"a": a, "b": b, "cos_centred": s[0] / s[2], "cos_raw": s[1] / s[2], "n": s[2]}
                for (a, b), s in self.sums.items() if s[2]]
