"""What the replacement model asks of a set of transcoders, in raw activation units.

The interface (shared with cross-layer transcoders, whose feature at layer `src` writes into every MLP output
`tgt` >= src): `encode_layer(L, x)` (MLP input -> feature activations [T, n]), `decode_to(M, acts_by_src)`
(reconstruction of MLP M's output from the activations of every source layer), `decoder_vectors(src, tgt, idx)`
(what features `idx` of layer `src` write into MLP `tgt`'s output per unit of activation; None where they write
nothing). Attribution also needs `encoder_vectors(L, idx)` (the input direction of each feature's
pre-activation) and `skip(L)` (a linear term of the MLP input, or None), and `layers` / `sae_id(L)`.
"""
from __future__ import annotations

import torch

from activations.errors import StrataError
from activations.hooks import split_key

CAPABLE_MODES = ("transcoder",)


class TranscoderSet:
    """One per-layer transcoder per covered layer (mode "transcoder": mlp_in.L -> mlp_out.L) behind the interface
    above; attribution graphs (sae/circuits) and the every-MLP-replaced eval (sae/evals/core.py) use it."""

    mode = "transcoder"

    def __init__(self, saes: dict):
        bad = {sid: s.cfg.mode for sid, s in saes.items() if s.cfg.mode not in CAPABLE_MODES}
        if bad:
            sid, mode = next(iter(bad.items()))
            raise StrataError(f"SAE {sid} is a {mode!r} SAE; attribution graphs need SAEs that replace MLPs: train with "
                              f"`--mode transcoder` (modes that support graphs: {', '.join(CAPABLE_MODES)})")
        self.by_layer: dict[int, tuple[str, object]] = {}
        for sid, sae in saes.items():
            (in_site, layer), (out_site, out_layer) = split_key(sae.cfg.in_keys[0]), split_key(sae.cfg.out_keys[0])
            if (in_site, out_site) != ("mlp_in", "mlp_out") or layer != out_layer:
                raise StrataError(f"transcoder {sid} maps {sae.cfg.in_keys[0]} to {sae.cfg.out_keys[0]}; attribution "
                                  f"graphs need transcoders from mlp_in.L to mlp_out.L of the same layer")
            if layer in self.by_layer:
                raise StrataError(f"transcoders {self.by_layer[layer][0]} and {sid} both replace MLP {layer}; "
                                  f"keep one transcoder per layer in the training run")
            self.by_layer[layer] = (sid, sae)

    @property
    def layers(self) -> list[int]:
        return sorted(self.by_layer)

    def sae_id(self, layer: int) -> str:
        return self.by_layer[layer][0]

    def n_latents(self, layer: int) -> int:
        return self.by_layer[layer][1].cfg.n_latents

    def context_length(self) -> int:
        return min(int(s.cfg.context_length or 0) for _, s in self.by_layer.values())

    def encode_layer(self, layer: int, x_TD: torch.Tensor) -> torch.Tensor:
        sae = self.by_layer[layer][1]
        return sae.encode(x_TD, sae.cfg.in_keys[0])

    def decode_to(self, layer: int, acts_by_src: dict) -> torch.Tensor:
        """mlp_out.<layer> from that layer's own latents (other layers' latents do not write here; without its
        latents, the decoder bias alone)."""
        sae = self.by_layer[layer][1]
        acts = acts_by_src.get(layer)
        if acts is None:
            return sae.b_dec / sae.out_scale(sae.cfg.out_keys[0])
        return sae.decode(acts, sae.cfg.out_keys[0])

    def decoder_vectors(self, src: int, tgt: int, idx: torch.Tensor) -> torch.Tensor | None:
        if src != tgt:
            return None
        sae = self.by_layer[src][1]
        return sae.W_dec[idx] / sae.out_scale(sae.cfg.out_keys[0])

    def encoder_vectors(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        sae = self.by_layer[layer][1]
        return sae.W_enc[:, idx].t() * sae.in_scale(sae.cfg.in_keys[0])

    def skip(self, layer: int):
        sae = self.by_layer[layer][1]
        if sae.W_skip is None:
            return None
        s_in, s_out = sae.in_scale(sae.cfg.in_keys[0]), sae.out_scale(sae.cfg.out_keys[0])
        return lambda x: (x * s_in) @ sae.W_skip / s_out
