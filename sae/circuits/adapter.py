"""What the replacement model asks of a set of transcoders, in raw activation units.

The interface (shared with cross-layer transcoders, whose feature at layer `src` writes into every MLP output
`tgt` >= src): `encode_layer(L, x)` (MLP input -> feature activations [T, n]), `decode_to(M, acts_by_src)`
(reconstruction of MLP M's output from the activations of every source layer), `decoder_vectors(src, tgt, idx)`
(what features `idx` of layer `src` write into MLP `tgt`'s output per unit of activation; None where they write
nothing). Attribution also needs `encoder_vectors(L, idx)` (the input direction of each feature's
pre-activation) and `skip(L)` (a linear term of the MLP input, or None), `layers` / `sae_id(L)` / `n_latents(L)` /
`context_length()` / `mode`, and `feature_offset(L)`: where layer L's latents start in the SAE's own numbering (the
number the run's feature index and the Features page use; 0 for a per-layer transcoder, the layer block's start
for a CLT). `adapter_for(saes)` picks the adapter for a training run's SAEs.
"""
from __future__ import annotations

import torch

from activations.errors import StrataError
from activations.hooks import split_key

CAPABLE_MODES = ("transcoder", "clt")


def adapter_for(saes: dict):
    """The replacement-model adapter for a training run's SAEs: a CLT (the run's only SAE) or its transcoders."""
    clts = [sid for sid, s in saes.items() if s.cfg.mode == "clt"]
    if clts and len(saes) > 1:
        raise StrataError(f"the training run holds the CLT {clts[0]} beside {len(saes) - 1} other SAE(s); attribution "
                          f"graphs replace the MLPs with one system: train the CLT in its own training run (--name)")
    if clts:
        return CLTAdapter(clts[0], saes[clts[0]])
    return TranscoderSet(saes)


class TranscoderSet:
    """One per-layer transcoder per covered layer (mode "transcoder": mlp_in.L -> mlp_out.L) behind the interface
    above; attribution graphs (sae/circuits) and the every-MLP-replaced eval (sae/evals/core.py) use it."""

    mode = "transcoder"

    def __init__(self, saes: dict):
        bad = {sid: s.cfg.mode for sid, s in saes.items() if s.cfg.mode != self.mode}
        if bad:
            sid, mode = next(iter(bad.items()))
            raise StrataError(f"SAE {sid} is a {mode!r} SAE; attribution graphs need SAEs that replace MLPs: train with "
                              f"`--mode transcoder` or `--mode clt` (modes that support graphs: "
                              f"{', '.join(CAPABLE_MODES)})")
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

    def feature_offset(self, layer: int) -> int:
        return 0

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
        return sae.W_enc_ND[idx] * sae.in_scale(sae.cfg.in_keys[0])

    def skip(self, layer: int):
        sae = self.by_layer[layer][1]
        if sae.W_skip is None:
            return None
        s_in, s_out = sae.in_scale(sae.cfg.in_keys[0]), sae.out_scale(sae.cfg.out_keys[0])
        return lambda x: (x * s_in) @ sae.W_skip / s_out


class CLTAdapter:
    """A cross-layer transcoder (mode "clt", sae/clt.py) behind the interface above: the latent of layer `src`
    writes into the MLP output of `src` and of every later layer the CLT covers (a layer it does not cover is frozen
    like an uncovered layer of a transcoder set, so nothing is written there). Latent numbers inside a layer run
    0..n-1; the CLT's own numbering (its feature index) puts layer block s at s * n."""

    mode = "clt"

    def __init__(self, sae_id: str, clt):
        cfg = clt.cfg
        ins, outs = [split_key(k) for k in cfg.in_keys], [split_key(k) for k in cfg.out_keys]
        if ({site for site, _ in ins}, {site for site, _ in outs}) != ({"mlp_in"}, {"mlp_out"}) or \
                [L for _, L in ins] != [L for _, L in outs]:
            raise StrataError(f"CLT {sae_id} maps {cfg.in_keys} to {cfg.out_keys}; attribution graphs need a CLT from "
                              f"mlp_in.L to mlp_out.L of the same layers: retrain it with `--mode clt`")
        if cfg.layers != sorted(set(cfg.layers)):
            raise StrataError(f"CLT {sae_id} lists its layers as {cfg.layers}; attribution graphs need them in "
                              f"increasing order, each once: retrain it with `--mode clt --layers` ascending")
        self.sid, self.clt = sae_id, clt

    @property
    def layers(self) -> list[int]:
        return list(self.clt.cfg.layers)

    def sae_id(self, layer: int) -> str:
        return self.sid

    def n_latents(self, layer: int) -> int:
        return self.clt.n

    def feature_offset(self, layer: int) -> int:
        return self.clt.cfg.layers.index(layer) * self.clt.n

    def context_length(self) -> int:
        return int(self.clt.cfg.context_length or 0)

    def encode_layer(self, layer: int, x_TD: torch.Tensor) -> torch.Tensor:
        return self.clt.encode_layer(layer, x_TD)

    def decode_to(self, layer: int, acts_by_src: dict) -> torch.Tensor:
        """mlp_out.<layer> from the latents of every covered source layer <= layer (plus the bias once)."""
        return self.clt.decode_to(layer, {s: a for s, a in acts_by_src.items() if s <= layer})

    def decoder_vectors(self, src: int, tgt: int, idx: torch.Tensor) -> torch.Tensor | None:
        if tgt < src or tgt not in self.clt.cfg.layers:
            return None
        return self.clt.decoder_vectors(src, tgt, idx)

    def encoder_vectors(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        s = self.clt.cfg.layers.index(layer)
        return self.clt.W_enc_layers[s][idx].detach() * float(self.clt.cfg.in_scales[s])

    def skip(self, layer: int):
        return None
