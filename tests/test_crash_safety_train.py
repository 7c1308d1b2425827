"""Crash safety of `strata train`: a run killed with SIGKILL at an exact point of its work, then continued with
`--resume`, ends with the same files, bit for bit, as a run that was never interrupted.

Each kill point runs `strata train` in a child process through tests/kill_at.py: before Strata is imported, it
wraps one library function the product calls (safetensors' save_file, os.replace, shutil.rmtree, the atomic JSON
writer, the SAE step, the metrics logger) so that its n-th matching call sends the process SIGKILL, before or
after the real call or halfway through the write. No kill hook lives in the product code. The tiny run: 2 SAEs
(resid.0, resid.3), 12 steps, checkpoints after steps 4 and 8 and at the end, a metrics record every 2 steps.
"""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from kill_at import KillPoint, run_until_killed

NAME = "crash"
FLAGS = ["--name", NAME, "--layers", "0,3", "--batch-size", "64", "--max-tokens", str(64 * 12), "--expansion", "4",
         "--k", "8", "--checkpoint-every", "4", "--log-every", "2", "--progress", "false", "--device", "cpu"]


# safetensors writes per checkpoint: 1 = resid.0 weights, 2 = resid.3 weights, 3 = optimizer (then 4-6, 7-9)
POINTS = [
    KillPoint("config-json-half-written", "json", 1, "torn", "config.json"),
    KillPoint("first-ckpt-first-sae-half-written", "save_file", 1, "torn"),
    KillPoint("first-ckpt-between-sae-folders", "save_file", 2, "before"),
    KillPoint("first-ckpt-optimizer-half-written", "save_file", 3, "torn"),
    KillPoint("first-ckpt-before-state-json", "json", 1, "before", "state.json"),
    KillPoint("first-ckpt-complete-before-swap", "replace", 1, "before", "checkpoint.partial"),
    KillPoint("metrics-line-half-written", "log", 3, "torn"),
    KillPoint("mid-training-between-saes-of-a-step", "sae.optim:SAEStepper.step", 2 * 6 + 1, "before"),
    KillPoint("second-ckpt-old-moved-aside-new-not-in", "replace", 1, "after", "checkpoint.old"),
    KillPoint("second-ckpt-swapped-old-still-there", "replace", 2, "after", "checkpoint.partial"),
    KillPoint("second-ckpt-old-partly-removed", "rmtree", 1, "torn", "checkpoint.old/saes"),
    KillPoint("final-ckpt-optimizer-half-written", "save_file", 9, "torn"),
    KillPoint("final-ckpt-before-state-json", "json", 3, "before", "state.json"),
    KillPoint("final-ckpt-swapped-old-still-there", "replace", 3, "after", "checkpoint.partial"),
]


# ---------------------------------------------------------------- the test: kill, resume, compare
def _train_in_process(run: Path, *extra) -> None:
    from strata.cli import main

    assert main(["train", str(run), *FLAGS, *extra]) == 0


def _files(run: Path) -> dict:
    """Every file of train/<name>, as a researcher would compare them: bytes, except that metrics records are
    compared without their throughput (tokens_per_s) and config.json without the run's own path."""
    tdir = run / "train" / NAME
    out = {}
    for p in sorted(tdir.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(tdir))
        if rel == "metrics.jsonl":
            records = [json.loads(ln) for ln in p.read_text().splitlines()]
            out[rel] = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]
        elif rel == "config.json":
            data = json.loads(p.read_text())
            data["config"].pop("run_dir")
            out[rel] = data
        else:
            out[rel] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_run) -> dict:
    """The files of the same training, never interrupted."""
    import torch

    run = tmp_path_factory.mktemp("crash-ref") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train", "index", "share", ".locks", ".strata.lock"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_in_process(run)
    finally:
        torch.set_num_threads(n)
    return _files(run)


@pytest.mark.parametrize("point", POINTS, ids=[p.id for p in POINTS])
def test_killed_then_resumed_equals_uninterrupted(point, reference, tiny_run, tmp_path, one_thread):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train", "index", "share", ".locks", ".strata.lock"))
    proc = run_until_killed(point, ["train", run, *FLAGS], OMP_NUM_THREADS="1")
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point.id} (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    assert (run / "train" / NAME).is_dir()

    _train_in_process(run, "--resume")
    got = _files(run)
    assert sorted(got) == sorted(reference), "the same files, no leftovers (.partial, .old)"
    for rel, want in reference.items():
        assert got[rel] == want, f"{rel} differs after a kill at {point.id}"
    assert json.loads((run / "train" / NAME / "checkpoint" / "state.json").read_text())["done"] is True


def test_there_are_at_least_ten_kill_points():
    assert len({p.id for p in POINTS}) == len(POINTS) >= 10

