"""Kills, corrupt files and bad input: finished work survives, errors are one line, nothing is half-written."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from activations.manifest import load_manifest
from activations.verify import verify_run
from conftest import harvest_tiny
from strata.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _files(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*.h5"))}


def test_resume_after_kill_gives_identical_files(tmp_path, tiny_llama):
    args = ["harvest", "--model", str(tiny_llama), "--sites", "resid,mlp_out", "--context", "32",
            "--batch-contexts", "2", "--shard-tokens", "64", "--max-tokens", "4096", "--progress", "false"]
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "strata.cli", *args[:1], str(killed), *args[1:]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(json.loads((killed / "manifest.json").read_text())["shards"]) >= 5:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = load_manifest(killed)
    assert not partial.complete and 5 <= len(partial.shards) < 64, "killed mid-run"
    assert main([*args[:1], str(killed), *args[1:], "--resume"]) == 0
    assert main([*args[:1], str(tmp_path / "clean"), *args[1:]]) == 0
    a, b = load_manifest(killed), load_manifest(tmp_path / "clean")
    assert a.complete and a.n_tokens == b.n_tokens == 4096
    assert [s.files for s in a.shards] == [s.files for s in b.shards]
    assert _files(killed) == _files(tmp_path / "clean"), "byte-identical shards"
    assert not list(killed.rglob("*.partial"))


def test_verify_names_truncated_and_bit_flipped_shards(tmp_path, tiny_gpt2, capsys):
    run = tmp_path / "run"
    harvest_tiny(run, tiny_gpt2, sites="resid", layers="1,2", max_tokens=3072)
    assert verify_run(run) == []
    capsys.readouterr()
    truncated = run / "acts/resid.1/shard-00001.h5"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    flipped = run / "acts/resid.2/shard-00002.h5"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    problems = verify_run(run)
    assert any("resid.1/shard-00001.h5" in p for p in problems)
    assert any("resid.2/shard-00002.h5" in p and "checksum" in p for p in problems)
    assert not any("shard-00000" in p for p in problems)
    assert main(["verify", str(run)]) == 2
    out = capsys.readouterr()
    assert "shard-00001.h5" in out.out and out.err.count("\n") == 1


def _one_line_error(capsys, argv, match: str, run: Path | None = None):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("strata: error: ") and err.count("\n") == 1 and match in err, err
    if run is not None:
        assert not list(run.rglob("*.partial")), "no partial files left"
    return err


def test_bad_input_gets_one_line_errors(tmp_path, tiny_llama, capsys):
    m = ["--model", str(tiny_llama), "--progress", "false", "--context", "32"]
    run = tmp_path / "r"
    _one_line_error(capsys, ["harvest", str(run), "--model", "no-such-org/no-such-model"], "cannot load model", run)
    assert not (run / "manifest.json").exists()
    _one_line_error(capsys, ["harvest", str(run), *m, "--layers", "0-9"], "layer 4 does not exist")
    _one_line_error(capsys, ["harvest", str(run), *m, "--sites", "resid,bogus"], "unknown site 'bogus'")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("too short")  # an empty file is its own error (test_bad_input)
    _one_line_error(capsys, ["harvest", str(run), *m, "--data", str(empty)], "no complete context", run)
    assert not (run / "manifest.json").exists(), "a failed fresh run leaves no manifest"
    jl = tmp_path / "x.jsonl"
    jl.write_text(json.dumps({"content": "hello"}) + "\n")
    _one_line_error(capsys, ["harvest", str(run), *m, "--data", str(jl)], "no 'text' field")
    _one_line_error(capsys, ["harvest", str(run), *m, "--dataset", "nobody/nothing-here"], "cannot open dataset")
    assert main(["harvest", str(run), *m, "--max-tokens", "256", "--layers", "1"]) == 0
    _one_line_error(capsys, ["harvest", str(run), *m, "--max-tokens", "512", "--layers", "1"], "already holds a different run")
    _one_line_error(capsys, ["harvest", str(run), *m, "--max-tokens", "512", "--layers", "1", "--resume"],
                    "max_tokens: 256 -> 512")
    assert main(["harvest", str(run), *m, "--max-tokens", "512", "--layers", "1", "--overwrite"]) == 0
    assert load_manifest(run).n_tokens == 512


def test_disk_full_stops_cleanly_and_keeps_complete_shards(tmp_path, tiny_llama, monkeypatch, capsys):
    from activations import shards

    calls = {"n": 0}
    real = shards.ActivationShardWriter.append

    def append(self, block):
        calls["n"] += 1
        if calls["n"] > 9:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, block)

    monkeypatch.setattr(shards.ActivationShardWriter, "append", append)
    run = tmp_path / "full"
    argv = ["harvest", str(run), "--model", str(tiny_llama), "--layers", "1", "--context", "32",
            "--batch-contexts", "4", "--shard-tokens", "256", "--max-tokens", "2048", "--progress", "false"]
    err = _one_line_error(capsys, argv, "disk full", run)
    assert "--resume" in err
    m = load_manifest(run)
    assert len(m.shards) == 4 and not m.complete and verify_run(run) == []
    monkeypatch.setattr(shards.ActivationShardWriter, "append", real)
    assert main(argv + ["--resume"]) == 0 and load_manifest(run).n_tokens == 2048


def test_non_finite_activations_are_reported_with_their_place(tmp_path, tiny_llama, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e9)  # overflows float16 storage
    bad = tmp_path / "bad-model"
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(bad)
    run = tmp_path / "nan"
    capsys.readouterr()
    err = _one_line_error(capsys, ["harvest", str(run), "--model", str(bad), "--context", "32", "--max-tokens", "256",
                                   "--sites", "resid,mlp_out", "--progress", "false"], "non-finite activation at mlp_out.1", run)
    assert "token" in err and "bfloat16" in err
