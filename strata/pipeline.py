"""`strata demo`: the whole data path on the embedded default, offline, in a few minutes on two cores.

harvest (SmolLM2-135M on CPython's docs) -> train a multi-layer SAE and a per-layer bank -> eval -> analyze ->
dashboard. Each stage resumes: rerunning the demo after an interruption continues where it stopped, and a
finished stage is skipped.

The token budget follows the machine: where the precision probe picks bf16 (a CPU with AVX-512-BF16 or AMX, a
GPU), the model forward and the SAE matmuls run about 2x and 1.5x faster, so the demo harvests 4x the tokens
and trains one epoch over them, in about the wall time the fp32 budget (4 epochs over a quarter of the tokens)
takes on a CPU without fast bf16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Interval

from activations import layout
from activations.config import option as _f
from activations.config_types import LAYER_SPEC

FP32_TOKENS, FP32_EPOCHS = 49152, 4       # ~4 minutes on two cores without fast bf16
BF16_TOKENS, BF16_EPOCHS = 4 * 49152, 1   # the same time where the model and SAEs run in bf16

@dataclass
class DemoConfig:
    run_dir: str = _f("runs/demo", "run directory")
    model: str = _f("smollm2-135m", "model to harvest (the embedded default needs no network)")
    layers: Annotated[str, LAYER_SPEC] = _f("0-30:6", "residual-stream layers to harvest and train on")
    max_tokens: Annotated[int, Ge(0)] = _f(0, f"harvest budget in tokens (0 = by precision: {FP32_TOKENS:,} in fp32, "
                                               f"{BF16_TOKENS:,} where bf16 is fast)")
    context: Annotated[int, Gt(0)] = _f(128, "tokens per context")
    expansion: Annotated[int, Gt(0)] = _f(4, "latents per input dimension")
    k: Annotated[int, Gt(0)] = _f(32, "active latents per token (TopK)")
    batch_size: Annotated[int, Gt(0)] = _f(1024, "training batch in tokens")
    epochs: Annotated[int, Ge(0)] = _f(0, f"passes over the training shards (0 = by precision: {FP32_EPOCHS} in fp32, "
                                          f"{BF16_EPOCHS} over the 4x larger harvest where bf16 is fast)")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto", "precision of every stage: auto (bf16 where a one-off probe finds it >= 1.5x faster than fp32 on "
                "this machine; it also sets the token budget), fp32, bf16")
    shard_tokens: Annotated[int, Gt(0)] = _f(16384, "tokens per shard")
    serve: bool = _f(True, "launch the dashboard at the end")
    port: Annotated[int, Interval(ge=1, le=65535)] = _f(8501, "dashboard port")


def budget(cfg: DemoConfig, precision: str) -> tuple[int, int]:
    """(harvest tokens, training epochs): the flags when given, else the budget of the chosen precision."""
    tokens, epochs = (BF16_TOKENS, BF16_EPOCHS) if precision == "bf16" else (FP32_TOKENS, FP32_EPOCHS)
    return cfg.max_tokens or tokens, cfg.epochs or epochs


def harvest_precision(cfg: DemoConfig):
    """The precision the harvest runs in: the one a started run recorded, else what --precision resolves to here
    (the same probe, cached, that the harvest itself consults)."""
    from activations.manifest import load_manifest
    from activations.model import forward_matmul_shapes, load_model, resolve_device
    from activations.precision import Precision, resolve

    if layout.manifest_path(cfg.run_dir).exists():
        recorded = load_manifest(cfg.run_dir).precision
        if recorded.get("precision") in ("fp32", "bf16"):
            return Precision(recorded["precision"], f"as {cfg.run_dir} was harvested")
    if cfg.precision != "auto":
        return resolve(cfg.precision, resolve_device("auto"), [])
    device = resolve_device("auto")
    lm = load_model(cfg.model, device, "float32")  # for the shapes of its matmuls
    return resolve("auto", device, forward_matmul_shapes(lm, 8 * cfg.context))  # 8: harvest's --batch-contexts


def run_demo(cfg: DemoConfig) -> None:
    from activations.config import HarvestConfig
    from activations.harvest import harvest
    from activations.manifest import load_manifest
    from sae import train_folder
    from sae.analysis.analyze import AnalyzeConfig, analyze
    from sae.checkpoint import read_checkpoint
    from sae.evaluate import EvalConfig, evaluate, format_report
    from sae.train import train
    from sae.train_config import TrainConfig

    run = cfg.run_dir
    if cfg.serve:  # a taken port is said now, not after minutes of work
        from dashboard.serve import check_port_free

        check_port_free("localhost", cfg.port)
    prec = harvest_precision(cfg)
    max_tokens, epochs = budget(cfg, prec.name)
    if not cfg.max_tokens and layout.manifest_path(run).exists():  # a started demo continues with its own budget
        max_tokens = int(load_manifest(run).config.get("max_tokens", max_tokens))
    names = {"mlsae": "multilayer", "bank": "layer"}
    started = [c for c in (train_folder.read_config(layout.train_dir(run, n)) for n in names) if c is not None]
    if not cfg.epochs and started:
        epochs = int(started[0]["identity"].get("epochs", epochs))
    print(f"[0/5] precision {prec.name} ({prec.reason}) -> budget: harvest {max_tokens:,} tokens, "
          f"{epochs} epoch(s) of training")
    print(f"[1/5] harvest {cfg.model} layers {cfg.layers} -> {run}")
    harvest(HarvestConfig(run_dir=run, model=cfg.model, sites="resid", layers=cfg.layers, context=cfg.context,
                          max_tokens=max_tokens, shard_tokens=cfg.shard_tokens, precision=cfg.precision,
                          resume=layout.manifest_path(run).exists()))
    for name, mode in names.items():
        print(f"[2/5] train {name}: TopK k={cfg.k}, {cfg.expansion}x, mode {mode}")
        train(TrainConfig(run_dir=run, name=name, mode=mode, arch="topk", layers=cfg.layers, expansion=cfg.expansion,
                          k=cfg.k, batch_size=cfg.batch_size, epochs=epochs, checkpoint_every=50,
                          precision=cfg.precision, resume=layout.train_dir(run, name).exists()))
        state, _ = read_checkpoint(run, name)
        print(f"  training tokens: {int(state['tokens']):,} per SAE ({epochs} epoch(s) over the training shards)")
    for name in names:
        print(f"[3/5] eval {name}")
        print(format_report(evaluate(EvalConfig(run_dir=run, name=name, ce_contexts=8, precision=cfg.precision))))
    print("[4/5] analyze: feature index")
    for path in analyze(AnalyzeConfig(run_dir=run, precision=cfg.precision)):
        print(f"  wrote {path}")
    if cfg.serve:
        from dashboard.serve import serve_dashboard

        print("[5/5] dashboard (Ctrl+C to stop)")
        serve_dashboard(run, port=cfg.port)
