"""Sparse encode/decode kernels for TopK-style SAEs: only the selected latents cost anything after the dense
encoder matmul.

The selection (which latents are active) is made on detached pre-activations; `gather_preacts` then returns
the selected values with a backward that touches only the selected (example, latent) pairs: the encoder
gradient is one sparse [n_latents, B] x [B, d] product (`transpose_matmul`) instead of a dense matmul.
Every selected pair receives its gradient, AuxK's dead-latent picks included, so dead latents' encoder rows
keep training (a fused backward that only looks at the top-k would silently stop AuxK).
`sparse_decode` gathers the active decoder rows (embedding_bag with per-sample weights); its backward
writes those rows only and never forms the dense B x n_latents latent matrix. Measured alternatives that lost on
CPU (scripts/bench_train.py setting): MKL CSR x dense for the transposed products, embedding_bag's own backward,
index_add, torch.topk over whole rows (see topk_rows).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from sae import cpu_select


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, val, size=size, check_invariants=False)


def column_order(cols: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, starts): the entries sorted by column (stable) and where each column's run begins. The encoder's and
    the decoder's backward both need it for the same top-k entries, so the step computes it once."""
    order = torch.argsort(cols, stable=True)
    counts = torch.bincount(cols, minlength=n_cols)
    return order, torch.cumsum(counts, 0) - counts


def transpose_matmul(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_cols: int,
                     dense: torch.Tensor, by_col=None) -> torch.Tensor:
    """S^T @ dense for the sparse S[B, n_cols] with entries (rows, cols, vals): result [n_cols, dense.shape[1]].

    Row c of the result is the vals-weighted sum of the dense rows of column c's entries: entries sorted by column
    become embedding_bag's bags (one gather-and-accumulate pass, no zero-filled output to copy). On CPU ~1.6x cheaper
    than MKL's CSR x dense product and ~50x cheaper than index_add over B*k materialised rows.
    `by_col`: column_order(cols, n_cols) if already computed."""
    order, starts = by_col if by_col is not None else column_order(cols, n_cols)
    return F.embedding_bag(rows[order], dense, starts, mode="sum", per_sample_weights=vals[order].to(dense.dtype))


def topk_rows(pre_BN: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) [B, k] of each row's k largest entries, unsorted: the same set as pre_BN.topk(k, dim=1)
    (ties at the k-th value may pick another of the equal entries). On CPU the compiled one-pass selection
    (sae/cpu_select.py, ~2x cheaper than grouped_topk_rows) where it could be built; elsewhere grouped_topk_rows."""
    if cpu_select.supports(pre_BN, k):
        return cpu_select.topk_rows(pre_BN, k)
    return grouped_topk_rows(pre_BN, k)


def topk_flat(pre_BN: torch.Tensor, k_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, flat indices into pre_BN.reshape(-1)) [k_total], unsorted: the k_total largest entries of the whole
    tensor, BatchTopK's batch-level choice. On CPU the compiled selection over the tensor as one row (4,096 x 4,608
    bf16, k_total = 131,072: ~19 vs ~227 ms for torch.topk); elsewhere torch.topk."""
    row_1N = pre_BN.reshape(1, -1)
    if cpu_select.supports(row_1N, k_total):
        vals_1K, flat_1K = cpu_select.topk_rows(row_1N, k_total)
        return vals_1K[0], flat_1K[0]
    return pre_BN.reshape(-1).topk(k_total, sorted=False)


def batch_select(pre_BN: torch.Tensor, k_total: int):
    """BatchTopK's training choice: (rows, cols, vals) of the k_total largest entries of the batch, sorted by row
    (row-major), vals relu'd."""
    n = pre_BN.shape[1]
    vals, flat = topk_flat(pre_BN, k_total)
    flat, order = flat.sort()
    return flat // n, flat % n, vals[order].clamp_(min=0)


def grouped_topk_rows(pre_BN: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_rows in torch operations.

    Cheap stages instead of one partial sort over all n entries per row (torch's CPU topk costs ~7 ns per entry):
    split each row into G strided groups (entry j in group j % G), take each group's max (one vectorised pass),
    keep the k groups with the largest maxima. Exact: if a top-k entry v lay in a group g outside the k best, each of
    those k groups would hold an entry (its max) above max(g) >= v: k entries above v, a contradiction. The smallest
    of the k best maxima, tau, bounds the answer from below (those k maxima are all >= tau), so of the chosen groups'
    k * n/G entries only the few >= tau (about k) go to the last topk (_top_of_kept, on CPU). ~40% cheaper than
    torch.topk at n=4,608, k=32 on CPU (one thread, 4,096 bf16 rows: ~22 vs ~40 ms); falls back to
    torch.topk where n has no suitable divisor."""
    B, n = pre_BN.shape
    s = _group_size(n, k)
    if s is None:
        return pre_BN.topk(k, dim=1, sorted=False)
    G = n // s
    pre_BSG = pre_BN.reshape(B, s, G)
    gmax_BK, groups_BK = pre_BSG.amax(1).topk(k, dim=1, sorted=False)
    cand_BC = torch.gather(pre_BSG, 2, groups_BK.unsqueeze(1).expand(B, s, k)).view(B, s * k)
    if pre_BN.device.type == "cpu":
        vals_BK, j_BK = _top_of_kept(cand_BC, cand_BC >= gmax_BK.amin(1, keepdim=True), k)
    else:  # measured on CPU only; on a GPU the plain topk of the candidates needs no host round trips
        vals_BK, j_BK = cand_BC.topk(k, dim=1, sorted=False)
    cols_BK = torch.div(j_BK, k, rounding_mode="floor") * G + groups_BK.gather(1, j_BK % k)
    return vals_BK, cols_BK


def _top_of_kept(cand_BC: torch.Tensor, keep_BC: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, positions) [B, k] of the k largest kept entries of each row (every row keeps at least k): the kept
    entries are packed to the front of a [B, most kept] block (-inf after a row's own), then one small topk."""
    B = cand_BC.shape[0]
    rows, j = keep_BC.nonzero(as_tuple=True)  # row-major: each row's kept entries in order
    counts = torch.bincount(rows, minlength=B)
    if int(counts.min()) < k:  # only where a row holds NaN (nothing compares >= NaN): the plain topk
        return cand_BC.topk(k, dim=1, sorted=False)
    width = int(counts.max())
    if width == k and rows.numel() == B * k:  # exactly k kept everywhere: they are the answer
        j_BK = j.view(B, k)
        return cand_BC.gather(1, j_BK), j_BK
    pos = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    packed_BW = torch.full((B, width), float("-inf"), dtype=cand_BC.dtype, device=cand_BC.device)
    packed_BW[rows, pos] = cand_BC[rows, j]
    j_BW = torch.zeros((B, width), dtype=j.dtype, device=j.device)
    j_BW[rows, pos] = j
    vals_BK, p_BK = packed_BW.topk(k, dim=1, sorted=False)
    return vals_BK, j_BW.gather(1, p_BK)


def _group_size(n: int, k: int) -> int | None:
    """Entries per group for topk_rows: the divisor of n nearest 2 sqrt(n/k), with at least 4 entries per group and
    at least 4k groups; None where no divisor qualifies (then a plain topk is best). sqrt(n/k) would balance the
    group maxima's topk against a topk of the k chosen groups' entries, but the threshold prefilter makes the
    candidates cheap (about k of them survive whatever the group size), so larger groups, hence a smaller topk of
    the maxima, win: 24 entries per group ~10% cheaper than 12 at n=4,608, k=32 (CPU, one thread, bf16 rows)."""
    target = 2 * (n / k) ** 0.5
    sizes = [s for s in range(4, n // (4 * k) + 1) if n % s == 0]
    return min(sizes, key=lambda s: abs(s - target)) if sizes else None


def sampled_preacts(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, cols: torch.Tensor,
                    offsets: torch.Tensor) -> torch.Tensor:
    """(x_c @ W_enc + b_enc)[row_j, cols[j]] for the entries of each row (delimited by `offsets`, sorted by row), in
    W_enc's dtype: only the selected dot products (sampled dense-dense product), never the B x n matrix."""
    crow = torch.cat([offsets, offsets.new_tensor([cols.numel()])])
    pattern = _csr(crow, cols, torch.zeros(cols.numel(), dtype=W_enc.dtype, device=cols.device),
                   (x_c.shape[0], W_enc.shape[1]))
    return torch.sparse.sampled_addmm(pattern, x_c.to(W_enc.dtype), W_enc, beta=0).values() + b_enc[cols]


class _GatherPreacts(torch.autograd.Function):
    """vals = relu(((x - b_dec) @ W_enc + b_enc)[rows, cols]), with vals precomputed by the caller."""

    @staticmethod
    def forward(ctx, x_c, b_dec, W_enc, b_enc, rows, cols, vals, by_col):
        ctx.save_for_backward(x_c, W_enc, rows, cols, vals)
        ctx.has_b_dec = b_dec is not None
        ctx.by_col = by_col
        return vals

    @staticmethod
    def backward(ctx, grad_vals):
        x_c, W_enc, rows, cols, vals = ctx.saved_tensors
        n = W_enc.shape[1]
        g = torch.where(vals > 0, grad_vals, torch.zeros_like(grad_vals))  # relu gate
        grad_b_enc = torch.bincount(cols, weights=g, minlength=n).to(W_enc.dtype)
        grad_W_enc = None
        if ctx.needs_input_grad[2]:
            # gradient rows for latent-major W_enc ([d, n] stored as [n, d] rows): S^T @ x_c
            grad_W_enc = transpose_matmul(rows, cols, g, n, x_c.to(W_enc.dtype), ctx.by_col).t()
        grad_b_dec = None
        if ctx.has_b_dec and ctx.needs_input_grad[1]:
            # x_c = x - b_dec  =>  dL/db_dec = -sum_b S[b] @ W_enc^T = -W_enc @ colsum(S)
            grad_b_dec = -(W_enc @ grad_b_enc)
        return None, grad_b_dec, grad_W_enc, grad_b_enc, None, None, None, None


def gather_preacts(x_c, b_dec, W_enc, b_enc, rows, cols, vals, by_col=None):
    """Differentiable view of the selected pre-activations (see module docstring). x_c = x - b_dec (or x).
    by_col: column_order(cols, n_latents) if the caller has it."""
    return _GatherPreacts.apply(x_c, b_dec, W_enc, b_enc, rows, cols, vals, by_col)


class _SparseDecode(torch.autograd.Function):
    """out[b] = sum_j vals[j] * W_dec[cols[j]] over example b's entries (CSR rows delimited by `offsets`).

    Forward: embedding_bag. Backward, without ever forming the dense B x n_latents latent matrix:
    grad_vals[j] = <grad_out[row_j], W_dec[cols[j]]> (a sampled dense-dense product at the active pairs only), and
    grad_W_dec = S^T @ grad_out (transpose_matmul, as the encoder's backward). Together ~2x cheaper on CPU than
    embedding_bag's own backward, which sorts and zero-fills on every call."""

    @staticmethod
    def forward(ctx, vals, cols, offsets, W_dec, by_col):
        ctx.save_for_backward(vals, cols, offsets, W_dec)
        ctx.by_col = by_col
        return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals.to(W_dec.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        vals, cols, offsets, W_dec = ctx.saved_tensors
        n_rows, n_latents = grad_out.shape[0], W_dec.shape[0]
        crow = torch.cat([offsets, offsets.new_tensor([cols.numel()])])
        grad_vals = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            pattern = _csr(crow, cols, torch.zeros_like(vals, dtype=grad_out.dtype), (n_rows, n_latents))
            grad_vals = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.t(), beta=0).values().to(vals.dtype)
        if ctx.needs_input_grad[3]:
            rows = torch.repeat_interleave(torch.arange(n_rows, device=cols.device), crow.diff())
            grad_W_dec = transpose_matmul(rows, cols, vals, n_latents, grad_out, ctx.by_col)
        return grad_vals, None, None, grad_W_dec, None


def sparse_decode(vals: torch.Tensor, cols: torch.Tensor, offsets: torch.Tensor, W_dec: torch.Tensor,
                  by_col=None) -> torch.Tensor:
    """sum_j vals[j] * W_dec[cols[j]] per example (examples delimited by `offsets`, entries sorted by row): [B, d_out].
    by_col: column_order(cols, n_latents) if the caller has it."""
    return _SparseDecode.apply(vals, cols, offsets, W_dec, by_col)


def row_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row starts for entries sorted by row."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


def aux_select(pre_BN: torch.Tensor, dead_N: torch.Tensor, k_aux: int):
    """AuxK's picks: the k_aux largest pre-activations of each row among the dead latents, as (rows, cols, values
    clamped at 0), or None when AuxK is off or no latent is dead."""
    if k_aux <= 0 or not bool(dead_N.any()):
        return None
    ids = dead_N.nonzero().squeeze(1).to(pre_BN.device)
    ka = min(k_aux, ids.numel())
    vals, j = pre_BN[:, ids].topk(ka, dim=1, sorted=False)
    rows = torch.arange(pre_BN.shape[0], device=pre_BN.device).repeat_interleave(ka)
    return rows, ids[j].reshape(-1), vals.reshape(-1).clamp_(min=0)
