"""SAEConfig: everything that defines one trained SAE. Saved as cfg.json beside its weights; the loader's
`sae.cfg`. Normalisation lives here too: inputs are multiplied by one scalar per input key (estimated from a
sample so that E||x * s||^2 = d), so `encode`/`decode` take and return raw activation units."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
MODES = ("layer", "multilayer", "transcoder", "crosscoder", "clt")


@dataclass
class SAEConfig:
    arch: str
    d_in: int
    d_out: int
    n_latents: int
    k: int | None = 32                 # topk/batchtopk/matryoshka: active latents per example; jumprelu: L0 target
    mode: str = "layer"
    in_keys: list = field(default_factory=list)     # e.g. ["resid.3"]; crosscoder: x = concat over in_keys
    out_keys: list = field(default_factory=list)
    in_scales: list = field(default_factory=list)   # one normalisation scalar per in key (x_normalised = x * s)
    out_scales: list = field(default_factory=list)
    apply_b_dec_to_input: bool = True  # encode (x - b_dec); False for transcoders (input and output differ)
    normalize_decoder: bool = True     # decoder rows kept unit-norm (False: relu (norm-weighted L1), transcoder)
    skip: bool = False                 # transcoder: learned linear skip connection x @ W_skip
    k_aux: int = 0                     # AuxK: dead latents used to model the residual (0 = off)
    aux_coef: float = 1 / 32
    dead_tokens: int = 10_000_000      # a latent is dead after this many tokens without firing
    l1_coef: float = 0.0               # relu: weight of sum_i f_i ||d_i||
    l0_coef: float = 0.0               # jumprelu: weight of (L0/k - 1)^2
    jumprelu_bandwidth: float = 0.05   # rectangle-kernel width of the straight-through estimator
    sparsity: str = "target_l0"        # clt jumprelu: target_l0 (l0_coef * (L0/k - 1)^2) or tanh (the paper's)
    tanh_coef: float = 0.0             # clt tanh: lambda in lambda * sum_i tanh(c * a_i * ||W_dec,i||)
    tanh_c: float = 1.0                # clt tanh: c, the scale inside the tanh
    pre_act_coef: float = 0.0          # clt tanh: lambda_P of the pre-activation loss (divided by d, as l1_coef)
    matryoshka_prefixes: list = field(default_factory=list)  # nested dictionary sizes, last = n_latents
    model_id: str = ""
    hook_names: dict = field(default_factory=dict)  # key -> model module path (for interop)
    context_length: int = 0
    tokens_seen: int = 0
    dtype: str = "float32"
    imported: dict = field(default_factory=dict)  # `strata import`: source format and folder, what was folded in

    def to_dict(self) -> dict:
        """All fields, plus the site and layer of each input key for readers of cfg.json (ignored on load)."""
        d = dataclasses.asdict(self)
        d["sites"] = [k.rpartition(".")[0] for k in self.in_keys]
        d["layers"] = self.layers
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def layers(self) -> list[int]:
        """Layer index of each input key ("resid.3" -> 3)."""
        return [int(k.rsplit(".", 1)[1]) for k in self.in_keys]
