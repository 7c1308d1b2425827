"""Kills, corrupt files and bad input: finished work survives, errors are one line, nothing is half-written."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import harvest_tiny

from activations.manifest import load_manifest, save_manifest
from activations.verify import verify_run
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


# ---------------------------------------------------------------- run folders: refuse, never clear what is not ours
FLAGS = ["--sites", "resid,mlp_out", "--layers", "1,2", "--context", "32", "--batch-contexts", "4",
         "--shard-tokens", "256", "--max-tokens", "1536", "--progress", "false"]


def _harvest(run: Path, model: Path, *extra) -> int:
    return main(["harvest", str(run), "--model", str(model), *FLAGS, *extra])


def _tree(root: Path) -> dict[str, str]:
    """Every file under root with its sha256 (lock files are not content)."""
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".strata.lock"}


def test_a_run_without_its_manifest_is_refused_never_cleared(tmp_path, tiny_llama, capsys):
    run = tmp_path / "run"
    assert _harvest(run, tiny_llama) == 0
    (run / "train" / "my-sae").mkdir(parents=True)
    (run / "train" / "my-sae" / "sae.safetensors").write_bytes(b"weights the user trained for a week")
    (run / "manifest.json").rename(tmp_path / "manifest.json")  # moved away by accident
    before = _tree(run)
    for extra in (["--layers", "99"], ["--resume"], ["--overwrite"], []):
        err = _one_line_error(capsys, ["harvest", str(run), "--model", str(tiny_llama), *FLAGS, *extra], "no manifest.json")
        assert "put it back" in err and "acts/" in err and "train/" in err
        assert _tree(run) == before, f"harvest {extra} changed the folder"
    _one_line_error(capsys, ["verify", str(run)], "put it back")
    (tmp_path / "manifest.json").rename(run / "manifest.json")  # the advice works
    assert _harvest(run, tiny_llama, "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out and verify_run(run) == []
    assert (run / "train" / "my-sae" / "sae.safetensors").read_bytes() == b"weights the user trained for a week"


def test_overwrite_deletes_only_what_a_harvest_wrote(tmp_path, tiny_llama, capsys):
    run = tmp_path / "run"
    assert _harvest(run, tiny_llama) == 0
    (run / "train" / "topk").mkdir(parents=True)
    (run / "train" / "topk" / "config.json").write_text("{}")
    (run / "index").mkdir()
    (run / "index" / "topk.h5").write_bytes(b"feature index")
    (run / "NOTES.md").write_text("why I harvested this\n")
    (run / "acts" / "resid.1" / "plot.png").write_bytes(b"my plot")
    before = _tree(run)
    err = _one_line_error(capsys, ["harvest", str(run), "--model", str(tiny_llama), *FLAGS, "--overwrite"], "train/topk")
    assert "index/topk.h5" in err and "move or delete those yourself" in err
    assert _tree(run) == before
    shutil.move(run / "train", tmp_path / "kept-train")
    shutil.move(run / "index", tmp_path / "kept-index")
    assert _harvest(run, tiny_llama, "--max-tokens", "512", "--overwrite") == 0
    assert load_manifest(run).n_tokens == 512 and verify_run(run) == []
    assert (run / "NOTES.md").read_text() == "why I harvested this\n"
    assert (run / "acts" / "resid.1" / "plot.png").read_bytes() == b"my plot"
    assert sorted(p.name for p in (run / "tokens").iterdir()) == ["shard-00000.h5", "shard-00001.h5"], "old shards gone"


def test_a_users_folder_is_never_cleared_even_with_overwrite(tmp_path, tiny_llama, capsys):
    mine = tmp_path / "experiments"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "log.txt").write_text("my own training notes\n")
    (mine / "data.csv").write_text("a,b\n")
    before = _tree(mine)
    for extra in ([], ["--overwrite"], ["--resume"]):
        _one_line_error(capsys, ["harvest", str(mine), "--model", str(tiny_llama), *FLAGS, *extra], "Strata")
        assert _tree(mine) == before


def test_a_failed_fresh_harvest_leaves_no_trace_of_the_folders_it_made(tmp_path, tiny_llama, capsys):
    run = tmp_path / "new" / "deeper" / "run"
    _one_line_error(capsys, ["harvest", str(run), "--model", str(tiny_llama), *FLAGS[:2], "--layers", "99"], "layer 99")
    assert not (tmp_path / "new").exists(), "folders the failed harvest created are removed again"
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, ["harvest", str(empty), "--model", str(tiny_llama), "--layers", "99"], "layer 99")
    assert list(empty.iterdir()) == [], "a folder that existed is left as it was"


def test_a_kill_while_the_first_manifest_is_written_resumes(tmp_path, tiny_llama):
    """Killed before the first manifest was in place: only a partial file is left; --resume (and a plain rerun) start over."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json.partial").write_text('{"model": {"id": "x"}, "sha')  # torn write
    assert _harvest(run, tiny_llama, "--resume") == 0
    assert load_manifest(run).complete and verify_run(run) == [] and not list(run.rglob("*.partial"))
    again = tmp_path / "again"
    again.mkdir()
    (again / "manifest.json.partial").write_text('{"model": {"id": "x"}, "sha')
    assert _harvest(again, tiny_llama, "--overwrite") == 0, "--overwrite starts over too (it used to loop)"
    assert load_manifest(again).complete and not list(again.rglob("*.partial"))


# ---------------------------------------------------------------- one harvest at a time
def test_a_second_harvest_into_the_same_folder_is_refused_while_the_first_runs(tmp_path, tiny_llama, capsys):
    run = tmp_path / "run"
    flags = [f if f != "1536" else "12288" for f in FLAGS]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen([sys.executable, "-m", "strata.cli", "harvest", str(run), "--model", str(tiny_llama), *flags],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "manifest.json").is_file() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    for extra in ([], ["--resume"], ["--overwrite"]):
        err = _one_line_error(capsys, ["harvest", str(run), "--model", str(tiny_llama), *flags, *extra], "in use by")
        assert "strata harvest" in err and f"pid {first.pid}" in err
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    m = load_manifest(run)
    assert m.complete and m.n_tokens == 12288 and verify_run(run) == []


# ---------------------------------------------------------------- damaged shards: noticed, and re-created by --resume
def flip_chunk_byte(path: Path, dataset: str = "acts") -> None:
    """Flip one bit inside the first data chunk of `dataset` (what a failing disk or a bad copy does)."""
    import h5py

    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 37] ^= 0x04
    path.write_bytes(bytes(data))


def test_a_damaged_shard_stops_training_and_resume_recreates_it(tmp_path, tiny_llama, capsys, one_thread):
    run = tmp_path / "run"
    assert _harvest(run, tiny_llama) == 0
    original = _tree(run)
    flip_chunk_byte(run / "acts/resid.1/shard-00001.h5")
    capsys.readouterr()
    assert main(["verify", str(run)]) == 2
    out = capsys.readouterr()
    assert "resid.1/shard-00001.h5: checksum mismatch" in out.out and "--resume" in out.err and "--layers 1,2" in out.err
    train = ["train", str(run), "--name", "t", "--layers", "1", "--batch-size", "128", "--expansion", "2", "--k", "4",
             "--progress", "false", "--device", "cpu"]
    err = _one_line_error(capsys, train, "acts/resid.1/shard-00001.h5")
    assert "damaged" in err and "--resume" in err
    (run / "tokens/shard-00002.h5").unlink()
    (run / "acts/mlp_out.2/shard-00003.h5").unlink()
    (run / "acts/mlp_out.2/histogram.png").write_bytes(b"the user's plot")
    assert _harvest(run, tiny_llama, "--resume") == 0
    assert "re-creating 3 missing or damaged file(s) in 3 shard(s)" in capsys.readouterr().out
    assert (run / "acts/mlp_out.2/histogram.png").read_bytes() == b"the user's plot"
    restored = _tree(run)
    assert {k: v for k, v in restored.items()
            if not k.startswith(("train/", ".locks/")) and not k.endswith(".png")} == original, \
        "byte-identical to the originals"
    assert verify_run(run) == []
    assert main(train + ["--overwrite"]) == 0


# ---------------------------------------------------------------- disk full, read-only folders
def test_a_disk_that_fills_up_stops_the_harvest_before_a_shard_it_cannot_hold(tmp_path, tiny_llama, capsys, monkeypatch):
    """The disk fills up after 3 shards: the harvest stops cleanly before HDF5 hits the wall (a failed HDF5 write
    poisons the library and crashes the process at exit), and --resume finishes once there is room."""
    run = tmp_path / "run"
    real = shutil.disk_usage
    asked = []

    def filling_disk(path):  # another program fills the disk while shards 0-2 are written
        asked.append(path)
        return real(path)._replace(free=real(path).free if len(asked) <= 3 else 4096)
    monkeypatch.setattr(shutil, "disk_usage", filling_disk)
    err = _one_line_error(capsys, ["harvest", str(run), "--model", str(tiny_llama), *FLAGS], "disk full", run)
    assert "free space, then `strata harvest" in err and "--resume" in err
    m = load_manifest(run)
    assert len(m.shards) == 3 and not m.complete and verify_run(run) == [], "the complete shards are intact"
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert _harvest(run, tiny_llama, "--resume") == 0 and load_manifest(run).n_tokens == 1536


@contextlib.contextmanager
def read_only(folder: Path):
    """Make `folder` unwritable, also for root (which ignores permission bits): chattr +i there."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def test_read_only_folders_give_one_line_errors(tmp_path, tiny_llama, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    with read_only(parent):
        _one_line_error(capsys, ["harvest", str(parent / "run"), "--model", str(tiny_llama), *FLAGS], "cannot create")
        _one_line_error(capsys, ["harvest", str(parent), "--model", str(tiny_llama), *FLAGS], "writable")
    assert list(parent.iterdir()) == []
    run = tmp_path / "run"
    assert _harvest(run, tiny_llama, "--max-tokens", "512") == 0
    m = load_manifest(run)
    m.complete = False
    save_manifest(run, m)  # a run stopped early, to be resumed where nothing can be written
    before = _tree(run)
    with read_only(run), read_only(run / "acts" / "resid.1"), read_only(run / "tokens"):
        err = _one_line_error(capsys, ["harvest", str(run), "--model", str(tiny_llama), *FLAGS, "--max-tokens", "512",
                                       "--resume"], "cannot write")
    assert "writable" in err and _tree(run) == before
