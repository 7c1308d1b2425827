"""Scale-out: `strata train` under `torchrun --nproc-per-node 2` (gloo) gives the single-process SAEs."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import torchrun_strata

import sae.train
from activations import layout
from sae.checkpoint import load_saes
from sae.train import train
from sae.train_config import TrainConfig

OPTS = {"arch": "topk", "expansion": 2, "k": 8, "batch_size": 128, "max_tokens": 128 * 24, "log_every": 8, "checkpoint_every": 10,
            "seed": 3, "device": "cpu",  # gloo on CPU even where a GPU is present
        "precision": "fp32"}  # parity to 1e-5 is an fp32 property: bf16 rounds differently when the batch is split


def assert_same_saes(run, dist_name: str, single_name: str) -> None:
    dist, single = load_saes(run, dist_name), load_saes(run, single_name)
    assert list(dist) == list(single), "same SAE ids, in training order"
    for sid, s in single.items():
        d = dist[sid]
        assert d.cfg.tokens_seen == s.cfg.tokens_seen
        for key, ref in s.state_dict().items():
            got = d.state_dict()[key]
            scale = float(ref.abs().max()) if ref.is_floating_point() and ref.numel() else 1.0
            assert torch.allclose(got.double(), ref.double(), rtol=0, atol=1e-5 * max(scale, 1.0)), f"{sid}/{key}"
    ckpt = layout.checkpoint_dir(run, dist_name)
    assert sorted(p.name for p in ckpt.iterdir()) == [".strata-owned", "optimizer.safetensors", "saes", "state.json"]
    assert json.loads((ckpt / "state.json").read_text())["done"]


def interrupted_train(monkeypatch, **opts) -> None:
    """A single-process run stopped right after its first checkpoint (step 10), as if killed there."""
    real = sae.train.write_checkpoint

    def write_then_stop(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(sae.train, "write_checkpoint", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**opts))
    monkeypatch.undo()
    assert json.loads((layout.checkpoint_dir(opts["run_dir"], opts["name"]) / "state.json").read_text())["step"] == 10


def torchrun_matches_single(run, monkeypatch, parallel: str, name: str, ports: tuple[int, int], **opts) -> None:
    """`strata train --parallel P` under torchrun gives the single-process SAEs, both from scratch (train/<name>)
    and resumed from a single-process run's first checkpoint (train/<name>-resumed)."""
    torchrun_strata("train", ports[0], run, name=name, parallel=parallel, **opts)
    train(TrainConfig(run_dir=str(run), name=f"single-{name}", progress=False, **opts))
    assert_same_saes(run, name, f"single-{name}")
    interrupted_train(monkeypatch, run_dir=str(run), name=f"{name}-resumed", progress=False, **opts)
    torchrun_strata("train", ports[1], run, name=f"{name}-resumed", parallel=parallel, resume=True, **opts)
    assert_same_saes(run, f"{name}-resumed", f"single-{name}")


def test_data_parallel_matches_single_process(tiny_run, monkeypatch):
    opts = dict(OPTS, layers="1,2", expansion=8, k_aux=4, dead_tokens=128)  # AuxK on: dead counts all-reduced
    torchrun_matches_single(tiny_run, monkeypatch, "data", "dp", (29531, 29533), **opts)
    lines = layout.metrics_path(tiny_run, "dp").read_text().splitlines()
    assert json.loads(lines[-1])["saes"]["resid.1"]["auxk"] > 0, "AuxK ran on the dead latents"
    assert [json.loads(x)["tokens"] for x in lines] == [128 * s for s in (8, 16, 24)], "rank 0 logs each record once"


def test_layer_parallel_matches_single_process_bank(tiny_run, monkeypatch):
    torchrun_matches_single(tiny_run, monkeypatch, "layers", "lp", (29532, 29534), **dict(OPTS, layers="0-3"))
    record = json.loads(layout.metrics_path(tiny_run, "lp").read_text().splitlines()[-1])
    assert list(record["saes"]) == ["resid.0", "resid.1", "resid.2", "resid.3"], "metrics of every rank's SAEs"
