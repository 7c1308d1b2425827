"""TrainConfig: everything `strata train` needs. Defaults train a TopK per-layer bank on every residual-stream
key of the run, so `strata train RUN --arch topk` works with no other flag."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Interval

from activations.config import option as _f
from activations.config_types import LAYER_SPEC, SITE_LIST, SIZE_LIST, TextSpec


def _check_seeds(spec: str) -> None:
    parts = [p.strip() for p in spec.split(",")]
    if not any(parts):
        raise ValueError("no seed given (empty); give a comma list like 0,1,2, or leave seeds out to train one SAE per id")
    bad = [p for p in parts if not p.isdigit()]
    if bad:
        raise ValueError(f"seed {bad[0]!r} is not a non-negative integer; give a comma list like 0,1,2")
    seen = set()
    for p in parts:
        if int(p) in seen:
            raise ValueError(f"seed {int(p)} is listed twice; list each seed once (each seed trains one more SAE)")
        seen.add(int(p))


SEED_LIST = TextSpec("list of distinct non-negative ints (0,1,2 or [0, 1, 2])", _check_seeds)


@dataclass
class TrainConfig:
    run_dir: str = _f("runs/default", "harvest run directory to train on", cli=False)
    name: str = _f("", "name of this training run: RUN/train/<name> (default: <arch>-<mode>)")
    arch: Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"] = _f("topk", "SAE architecture")
    mode: Literal["layer", "multilayer", "transcoder", "crosscoder", "clt"] = _f(
        "layer", "layer (one SAE per key, one pass), multilayer (one SAE for all layers), "
                 "transcoder (mlp_in.L -> mlp_out.L), crosscoder (all layers of a token), "
                 "clt (cross-layer transcoder: mlp_in.L -> mlp_out of L and every later layer; topk, batchtopk, "
                 "jumprelu; --k per layer, --n-latents per layer)")
    sites: Annotated[str, SITE_LIST] = _f("resid", "hook sites to train on (transcoder and clt modes always read mlp_in/mlp_out)")
    layers: Annotated[str, LAYER_SPEC] = _f("all", "layers: 'all' or ints and ranges a-b[:step]")
    expansion: Annotated[int, Gt(0)] = _f(8, "latents per input dimension (n_latents = expansion * d) unless --n-latents")
    n_latents: Annotated[int, Ge(0)] = _f(0, "dictionary size (0 = expansion * d)")
    d_model: Annotated[int, Ge(0)] = _f(0, "expected activation width (0 = take it from the run); checked against the shards")
    k: Annotated[int, Gt(0)] = _f(32, "active latents per example (topk family); L0 target for jumprelu")
    k_aux: Annotated[int, Ge(-1)] = _f(0, "AuxK: dead latents used on the residual (0 = d/2; -1 = off)")
    aux_coef: Annotated[float, Ge(0)] = _f(1 / 32, "AuxK loss weight")
    dead_tokens: Annotated[int, Gt(0)] = _f(10_000_000, "a latent is dead after this many tokens without firing")
    l1_coef: Annotated[float, Ge(0)] = _f(5.0, "relu: L1 weight (per unit of normalised squared error)")
    l1_warmup_steps: Annotated[int, Ge(0)] = _f(0, "relu: steps of linear L1 warm-up (0 = 5% of the steps)")
    l0_coef: Annotated[float, Ge(0)] = _f(1.0, "jumprelu: weight of (L0/k - 1)^2")
    jumprelu_bandwidth: Annotated[float, Gt(0)] = _f(0.05, "jumprelu: straight-through estimator kernel width")
    sparsity: Literal["target_l0", "tanh"] = _f(
        "target_l0", "clt jumprelu penalty: target_l0 (--l0-coef * (L0/k - 1)^2 per layer; k = the L0 target) or tanh "
                     "(Ameisen et al. 2025: --tanh-coef * sum over latents of tanh(--tanh-c * a_i * ||W_dec,i||), "
                     "||W_dec,i|| the norm of latent i's decoders to every layer it writes; k = the starting L0)")
    tanh_coef: Annotated[float, Ge(0)] = _f(1e-3, "clt --sparsity tanh: lambda, the penalty weight (per token, per "
                                                  "unit of the summed per-layer FVU)")
    tanh_c: Annotated[float, Gt(0)] = _f(1.0, "clt --sparsity tanh: c, the scale inside the tanh (larger: the penalty "
                                              "saturates sooner, nearer an L0 count)")
    tanh_warmup_steps: Annotated[int, Ge(0)] = _f(0, "clt --sparsity tanh: steps over which lambda ramps linearly from 0 "
                                                     "to --tanh-coef (0 = the whole run, the paper's schedule; 1 = none)")
    pre_act_coef: Annotated[float, Ge(0)] = _f(3e-6, "clt --sparsity tanh: lambda_P of the pre-activation loss "
                                                     "lambda_P / d * sum_i ReLU(theta_i - h_i) ||W_dec,i|| (Anthropic, "
                                                     "Jan 2025: 3e-6 on E||x||^2 = d units); it lifts dead latents' "
                                                     "pre-activations h_i toward their thresholds (0 = off)")
    matryoshka_prefixes: Annotated[str, SIZE_LIST] = _f("", "matryoshka: comma list of nested sizes (default n/16,n/4,n)")
    skip: bool = _f(False, "transcoder: add a learned linear skip connection")
    lr: Annotated[float, Gt(0)] | None = _f(None, "Adam learning rate (default 2e-4 * sqrt(2^14 / n_latents))")
    warmup_steps: Annotated[int, Ge(0)] = _f(0, "linear lr warm-up steps (0 = 1% of the steps, at most 1000)")
    decay_fraction: Annotated[float, Interval(ge=0, le=1)] = _f(0.2, "fraction of the steps at the end with linear lr decay to 0")
    adam_eps: Annotated[float, Gt(0)] = _f(6.25e-10, "Adam epsilon")
    grad_clip: Annotated[float, Ge(0)] = _f(1.0, "clip the gradient norm of each SAE (0 = off)")
    batch_size: Annotated[int, Gt(0)] = _f(4096, "tokens per batch")
    epochs: Annotated[int, Gt(0)] = _f(1, "passes over the training shards")
    max_tokens: Annotated[int, Ge(0)] = _f(0, "stop after this many training tokens (0 = all training shards x epochs)")
    heldout_fraction: Annotated[float, Interval(ge=0, lt=1)] = _f(0.1, "fraction of shards (the last ones) held out for `strata eval`")
    exclude_first: Annotated[int, Ge(0)] = _f(1, "leave out the first N tokens of every context: attention-sink tokens whose "
                                          "norms are ~100x the rest (SmolLM2: 23k vs 136 at layer 12) would dominate "
                                          "the loss and FVU")
    norm_sample_tokens: Annotated[int, Gt(0)] = _f(8192, "tokens sampled to estimate normalisation and the decoder-bias init")
    b_dec_init: Literal["median", "mean", "zero"] = _f("median", "decoder bias init (median = geometric median)")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto", "dtype of the dense encoder matmul: auto (bf16 where a one-off probe finds it >= 1.5x faster than fp32 "
                "on this machine), fp32, bf16; weights and Adam state stay fp32")
    bf16: bool = _f(False, "old spelling of --precision bf16 (kept for existing configs)")
    seed: Annotated[int, Ge(0)] = _f(0, "seed for init and data order")
    seeds: Annotated[str | None, SEED_LIST] = _f(
        None, "train the same config once per seed, in one pass over the data: comma list like 0,1,2; each seed "
              "gives its own SAE <id>.s<seed> (its init from that seed; batches and data order from --seed)")
    log_every: Annotated[int, Gt(0)] = _f(20, "steps between metric records")
    checkpoint_every: Annotated[int, Gt(0)] = _f(500, "steps between checkpoints (one is always written at the end)")
    device: str = _f("auto", "auto (CUDA when present), cpu, cuda")
    parallel: Literal["auto", "data", "layers"] = _f(
        "auto", "under torchrun: data (each process a slice of every batch; the default) or layers "
                "(each process every N-th SAE of the bank); the result equals one process's")
    wandb_project: str = _f("", "also log to this Weights & Biases project")
    wandb_mode: Literal["online", "offline", "disabled"] = _f("online", "offline needs no network or account")
    resume: bool = _f(False, "continue RUN/train/<name> from its checkpoint (the config must be unchanged)")
    overwrite: bool = _f(False, "delete an existing RUN/train/<name> first")
    progress: bool = _f(True, "show a progress bar")

    def resolved_name(self) -> str:
        return self.name or f"{self.arch}-{self.mode}"

    def seed_list(self) -> list[int] | None:
        """The --seeds as ints, or None when not given (one SAE per id, initialised from --seed)."""
        return None if self.seeds is None else [int(p) for p in self.seeds.split(",")]

    def identity(self) -> dict:
        """Fields that define the result: a resume must match them exactly. Not `precision`: auto may resolve
        differently on another machine, and a resume may continue in another precision (it says so)."""
        skip = {"run_dir", "resume", "overwrite", "progress", "wandb_project", "wandb_mode", "log_every", "device",
                "checkpoint_every", "parallel", "precision"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
