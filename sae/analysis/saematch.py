"""SAE Match (Balagansky et al., ICLR 2025): pair the features of two SAEs one-to-one from their weights alone.

Each feature's scale is folded into its parameters first, so that features which do the same thing at
different magnitudes compare equal: a TopK / ReLU feature's decoder row is divided by its norm and the
encoder column multiplied by it (the activation then reads in units of the decoder's length); a JumpReLU
feature is divided/multiplied by its threshold instead (it then switches on at 1). Both SAEs are taken in
raw activation units (their normalisation scalars applied), and each SAE's folded vectors are divided by
their root-mean-square norm, so two layers whose residual norms differ still compare by direction and
relative size. The cost of pairing i with j is the squared distance of the folded decoder vectors plus that
of the folded encoder vectors, and scipy's linear_sum_assignment finds the pairing of least total cost
(rectangular when the widths differ: the surplus features of the wider SAE stay unassigned, -1).

`saematch_score` of a pair is 1 - cost / (sum of the four squared norms): 1 for identical folded parameters,
0 for orthogonal ones, negative for opposed ones.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


@torch.no_grad()
def folded(sae) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder [n, d_in], decoder [n, d_out]) in raw units with each feature's scale folded in, then each
    divided by its SAE-wide root-mean-square row norm."""
    enc_nd = sae.W_enc.detach().float().t() * sae.in_scale()
    dec_nd = sae.W_dec.detach().float() / sae.out_scale()
    if getattr(sae.cfg, "arch", "") == "jumprelu":
        scale_n = sae.threshold.detach().float() / sae.in_scale()  # raw-unit threshold of each feature
    else:
        scale_n = dec_nd.norm(dim=1)
    scale_n = scale_n.clamp_min(1e-12).unsqueeze(1)
    enc_nd, dec_nd = enc_nd * scale_n, dec_nd / scale_n

    def rms(m):
        return m / m.pow(2).sum(1).mean().sqrt().clamp_min(1e-12)

    return rms(enc_nd), rms(dec_nd)


@torch.no_grad()
def sae_match(up, down, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """One-to-one assignment of up's features to down's: (idx [n_up] int32, -1 = unassigned; score [n_up])."""
    e_a, d_a = folded(up)
    e_b, d_b = folded(down)
    sq_a = e_a.pow(2).sum(1) + d_a.pow(2).sum(1)
    sq_b = e_b.pow(2).sum(1) + d_b.pow(2).sum(1)
    cost = np.empty((len(d_a), len(d_b)), dtype=np.float64)
    for s in range(0, len(d_a), chunk):  # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, for encoder and decoder together
        dot = e_a[s:s + chunk] @ e_b.T + d_a[s:s + chunk] @ d_b.T
        cost[s:s + chunk] = (sq_a[s:s + chunk, None] + sq_b[None, :] - 2 * dot).clamp_min(0).double().cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    idx = torch.full((len(d_a),), -1, dtype=torch.int32)
    score = torch.full((len(d_a),), float("nan"))
    idx[rows] = torch.as_tensor(cols, dtype=torch.int32)
    norms = (sq_a.cpu()[rows] + sq_b.cpu()[cols]).double()
    score[rows] = (1 - torch.as_tensor(cost[rows, cols]) / norms.clamp_min(1e-12)).float()
    return idx, score
