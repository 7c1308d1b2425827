"""TopK (Gao et al. 2024) with AuxK, BatchTopK (arXiv 2412.06410) and Matryoshka BatchTopK (arXiv 2503.17547).

All three pick active latents from relu pre-activations, then decode sparsely (only the chosen decoder rows
are touched, forward and backward; see kernels.py). AuxK: the top k_aux *dead* latents reconstruct the
residual y - recon; its loss is that residual's FVU, weighted aux_coef (1/32).
"""
from __future__ import annotations

import torch

from sae import kernels
from sae.base import SAE, Output, fvu


class TopKSAE(SAE):
    def select(self, pre: torch.Tensor):
        """Active (rows, cols, vals) from pre-activations [B, n], sorted by row; vals relu'd (a selected
        negative pre-activation becomes an inactive 0)."""
        k = self.cfg.k
        vals, cols = kernels.topk_rows(pre, k)
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return rows, cols.reshape(-1), vals.reshape(-1).clamp_(min=0)

    def after_select(self, vals: torch.Tensor, n_rows: int) -> None:
        pass

    # rows per block of pre-activations in `choose` (None: the whole batch at once): TopK picks each row's latents
    # alone. On CPU (bf16, d=576, 4,608 latents, batch 4,096) blocks of 512 to 2,048 rows time alike, and choosing
    # costs ~15 ms less than over the whole batch's B x n tensor.
    choose_block_rows: int | None = 1024

    @torch.no_grad()
    def choose(self, x_c: torch.Tensor, with_aux: bool):
        """(rows, cols, vals) of the active latents (sorted by row, vals in the compute dtype) and AuxK's picks (or
        None), from detached pre-activations made and used block by block of rows (SAE.selection_blocks)."""
        dead = self.dead_mask() if with_aux else None
        picks, aux_picks = [], []
        for start, pre in self.selection_blocks(x_c, self.choose_block_rows or x_c.shape[0]):
            rows, cols, vals = self.select(pre)
            picks.append((rows + start, cols, vals))
            aux = kernels.aux_select(pre, dead, self.cfg.k_aux) if with_aux else None
            if aux is not None:
                aux_picks.append((aux[0] + start, aux[1], aux[2]))
        rows, cols, vals = (torch.cat(p) for p in zip(*picks))
        aux = tuple(torch.cat(p) for p in zip(*aux_picks)) if aux_picks else None
        return rows, cols, vals, aux

    def encode_n(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.raw_preacts(self.centered(x))
        rows, cols, vals = self.select(pre)
        f = torch.zeros_like(pre)
        f[rows, cols] = vals
        return f

    def _exact(self, x_c, rows, cols, n_rows):
        pre = kernels.sampled_preacts(x_c, self.W_enc, self.b_enc, cols, kernels.row_offsets(rows, n_rows))
        return pre.clamp_(min=0)

    def prefix_loss(self, y, vals, cols, offsets, loss_fn, by_col=None):
        """Reconstruction loss of the full dictionary (Matryoshka overrides with nested prefixes)."""
        recon = kernels.sparse_decode(vals, cols, offsets, self.W_dec, by_col).add_(self.b_dec)
        if self.W_skip is not None:
            recon = recon + self._skip
        return loss_fn(y, recon), recon, {}

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_fn=fvu, sparsity_scale: float = 1.0) -> Output:
        B, n = x.shape[0], self.cfg.n_latents
        with torch.no_grad():
            x_c = self.centered(x)
            rows, cols, vals, aux = self.choose(x_c, with_aux=self.training)
            if vals.dtype != torch.float32:  # chosen in bf16: the chosen values exactly, in fp32
                vals = self._exact(x_c, rows, cols, B)
                if aux is not None:
                    aux = aux[0], aux[1], self._exact(x_c, aux[0], aux[1], B)
            if self.training:
                self.after_select(vals, B)
        all_rows, all_cols, all_vals = rows, cols, vals
        if aux is not None:
            all_rows, all_cols, all_vals = (torch.cat([a, b]) for a, b in zip((rows, cols, vals), aux))
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        by_col = kernels.column_order(cols, n)  # the top-k entries by latent, for both backward products
        g = kernels.gather_preacts(x_c, b_dec, self.W_enc, self.b_enc, all_rows, all_cols, all_vals,
                                   by_col if aux is None else None)
        nnz = cols.numel()
        offsets = kernels.row_offsets(rows, B)
        self._skip = self.skip_out(x)
        loss, recon, parts = self.prefix_loss(y, g[:nnz], cols, offsets, loss_fn, by_col)
        parts["recon"] = loss.detach()
        if aux is not None:
            residual = (y - recon).detach()
            aux_recon = kernels.sparse_decode(g[nnz:], aux[1], kernels.row_offsets(aux[0], B), self.W_dec)
            auxk = torch.nan_to_num(loss_fn.one(residual, aux_recon), nan=0.0)
            parts["auxk"] = auxk.detach()
            loss = loss + self.cfg.aux_coef * auxk
        active = vals > 0
        fired = torch.bincount(cols[active], minlength=n)
        return Output(loss=loss, parts=parts, recon=recon.detach(), l0=active.sum() / B, fired=fired)


class BatchTopKSAE(TopKSAE):
    """Top k*B over the whole batch in training; at inference a global threshold: the EMA (beta 0.999) of
    the smallest kept activation per training batch."""

    beta = 0.999
    choose_block_rows = None  # the batch's top k*B is chosen over the whole batch

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def select(self, pre: torch.Tensor):
        if not self.training:  # inference: fixed threshold, rows vary in size
            rows, cols = (pre > self.threshold.clamp_min(0)).nonzero(as_tuple=True)
            return rows, cols, pre[rows, cols]
        return kernels.batch_select(pre, self.cfg.k * pre.shape[0])

    @torch.no_grad()
    def after_select(self, vals: torch.Tensor, n_rows: int) -> None:
        pos = vals[vals > 0]
        if pos.numel() == 0:
            return
        # running mean for the first 1/(1-beta) updates, then the EMA (so short runs get a usable threshold)
        self.threshold_updates += 1
        beta = min(self.beta, 1.0 - 1.0 / float(self.threshold_updates))
        self.threshold.mul_(beta).add_((1 - beta) * pos.min())

    def encode_n(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().encode_n(x)
        pre = self.raw_preacts(self.centered(x))
        return pre * (pre > self.threshold.clamp_min(0))


class MatryoshkaSAE(BatchTopKSAE):
    """Nested dictionaries: each prefix of the latents (sizes cfg.matryoshka_prefixes, last = n_latents)
    reconstructs the target alone; the loss is the mean of the prefix losses."""

    def prefix_loss(self, y, vals, cols, offsets, loss_fn, by_col=None):
        losses, parts = [], {}
        recon = None
        for size in self.cfg.matryoshka_prefixes:
            v = vals * (cols < size)
            recon = kernels.sparse_decode(v, cols, offsets, self.W_dec, by_col) + self.b_dec + self._skip
            losses.append(loss_fn(y, recon))
            parts[f"recon_prefix_{size}"] = losses[-1].detach()
        return torch.stack(losses).mean(), recon, parts
