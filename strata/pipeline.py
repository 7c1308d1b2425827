"""`strata demo`: the whole data path on the embedded default, offline, in a few minutes on two cores.

harvest (SmolLM2-135M on CPython's docs) -> train a multi-layer SAE and a per-layer bank -> eval -> analyze ->
dashboard. Each stage resumes: rerunning the demo after an interruption continues where it stopped, and a
finished stage is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from annotated_types import Gt, Interval

from activations import layout
from activations.config import option as _f
from activations.config_types import LAYER_SPEC


@dataclass
class DemoConfig:
    run_dir: str = _f("runs/demo", "run directory")
    model: str = _f("smollm2-135m", "model to harvest (the embedded default needs no network)")
    layers: Annotated[str, LAYER_SPEC] = _f("0-30:6", "residual-stream layers to harvest and train on")
    max_tokens: Annotated[int, Gt(0)] = _f(49152, "harvest budget in tokens")
    context: Annotated[int, Gt(0)] = _f(128, "tokens per context")
    expansion: Annotated[int, Gt(0)] = _f(4, "latents per input dimension")
    k: Annotated[int, Gt(0)] = _f(32, "active latents per token (TopK)")
    batch_size: Annotated[int, Gt(0)] = _f(1024, "training batch in tokens")
    epochs: Annotated[int, Gt(0)] = _f(4, "passes over the training shards")
    shard_tokens: Annotated[int, Gt(0)] = _f(16384, "tokens per shard")
    serve: bool = _f(True, "launch the dashboard at the end")
    port: Annotated[int, Interval(ge=1, le=65535)] = _f(8501, "dashboard port")


def run_demo(cfg: DemoConfig) -> None:
    from activations.config import HarvestConfig
    from activations.harvest import harvest
    from sae.analysis.analyze import AnalyzeConfig, analyze
    from sae.evaluate import EvalConfig, evaluate, format_report
    from sae.train import train
    from sae.train_config import TrainConfig

    run = cfg.run_dir
    if cfg.serve:  # a taken port is said now, not after minutes of work
        from dashboard.serve import check_port_free

        check_port_free("localhost", cfg.port)
    print(f"[1/5] harvest {cfg.model} layers {cfg.layers} -> {run}")
    harvest(HarvestConfig(run_dir=run, model=cfg.model, sites="resid", layers=cfg.layers, context=cfg.context,
                          max_tokens=cfg.max_tokens, shard_tokens=cfg.shard_tokens,
                          resume=layout.manifest_path(run).exists()))
    names = {"mlsae": "multilayer", "bank": "layer"}
    for name, mode in names.items():
        print(f"[2/5] train {name}: TopK k={cfg.k}, {cfg.expansion}x, mode {mode}")
        train(TrainConfig(run_dir=run, name=name, mode=mode, arch="topk", layers=cfg.layers, expansion=cfg.expansion,
                          k=cfg.k, batch_size=cfg.batch_size, epochs=cfg.epochs, checkpoint_every=50,
                          resume=layout.train_dir(run, name).exists()))
    for name in names:
        print(f"[3/5] eval {name}")
        print(format_report(evaluate(EvalConfig(run_dir=run, name=name, ce_contexts=8))))
    print("[4/5] analyze: feature index")
    for path in analyze(AnalyzeConfig(run_dir=run)):
        print(f"  wrote {path}")
    if cfg.serve:
        from dashboard.serve import serve_dashboard

        print("[5/5] dashboard (Ctrl+C to stop)")
        serve_dashboard(run, port=cfg.port)
