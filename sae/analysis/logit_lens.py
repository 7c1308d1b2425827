"""Logit lens: read the residual stream at a layer as if it were the last one.

The residual at layer L goes through the model's final norm and unembedding, exactly as the last layer's residual
does on its way to the logits (nostalgebraist 2020, "interpreting GPT: the logit lens"; Wendler et al. 2024, "Do
Llamas work in English?", read Llama-2's intermediate layers this way). At the last residual key (`resid.<n_layers>`,
taken before the final norm) the lens is the model's own next-token prediction.

The computation runs in the unembedding's dtype, as the model's own head does, so the lens at the last layer
reproduces the model's logits; probabilities come from a float32 softmax over the whole vocabulary.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def lens_logits(resid_TD: torch.Tensor, norm, W_U_VD: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] (float32) of residual vectors [T, d] through the final norm (None: no norm) and W_U."""
    h_TD = resid_TD.to(W_U_VD.device, W_U_VD.dtype)
    if norm is not None:
        h_TD = norm(h_TD).to(W_U_VD.dtype)
    return (h_TD @ W_U_VD.T).float()


@torch.no_grad()
def logit_lens(resid_TD: torch.Tensor, norm, W_U_VD: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next tokens at every position: (ids [T, k] int64, probabilities [T, k] float32)."""
    probs_TV = torch.softmax(lens_logits(resid_TD, norm, W_U_VD), dim=-1)
    top = torch.topk(probs_TV, min(k, probs_TV.shape[-1]), dim=-1)
    return top.indices.cpu(), top.values.cpu()
