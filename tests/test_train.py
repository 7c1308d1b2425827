"""`strata train` / `eval` / `export` / `import` on a harvest of a tiny random Llama, as a user would run them."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from activations import layout
from sae.checkpoint import load_sae, load_saes
from strata.cli import main

FAST = ["--batch-size", "256", "--expansion", "4", "--k", "8", "--progress", "false", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def strata(*args) -> int:
    return main([str(a) for a in args])


def last_record(run, name) -> dict:
    return json.loads(layout.metrics_path(run, name).read_text().splitlines()[-1])


def test_train_with_no_other_flag(run):
    assert strata("train", run, "--arch", "topk", "--progress", "false") == 0
    saes = load_saes(run, "topk-layer")
    assert list(saes) == ["resid.0", "resid.1", "resid.2", "resid.3"]
    sae = saes["resid.2"]
    assert sae.cfg.arch == "topk" and sae.cfg.n_latents == 8 * 32 and sae.cfg.k == 32
    assert sae.cfg.tokens_seen == 4096  # one batch of the default size from the 5 training shards
    assert (layout.train_dir(run, "topk-layer") / "config.json").is_file()


@pytest.mark.parametrize("mode,extra,ids", [
    ("layer", [], ["resid.0", "resid.1", "resid.2", "resid.3"]),
    ("multilayer", [], ["multilayer"]),
    ("transcoder", ["--skip"], ["transcoder.0", "transcoder.1", "transcoder.2"]),
    ("crosscoder", ["--layers", "1-3"], ["crosscoder"]),
])
def test_each_mode_trains_evaluates_and_loads(run, mode, extra, ids, capsys):
    name = f"t-{mode}"
    assert strata("train", run, "--mode", mode, "--name", name, "--epochs", "2", "--log-every", "5", *FAST, *extra) == 0
    rec = last_record(run, name)
    assert sorted(rec["saes"]) == sorted(ids)
    first = json.loads(layout.metrics_path(run, name).read_text().splitlines()[0])
    for sid in ids:
        assert rec["saes"][sid]["l0"] == 8
        assert rec["saes"][sid]["fvu"] < first["saes"][sid]["fvu"]  # it learned
    if mode in ("multilayer", "crosscoder"):  # per-layer metrics for the multi-layer modes
        keys = ["resid.0", "resid.1", "resid.2", "resid.3"] if mode == "multilayer" else ["resid.1", "resid.2", "resid.3"]
        assert all(f"fvu/{k}" in rec["saes"][ids[0]] for k in keys)

    assert strata("eval", run, "--name", name, "--batch-size", "256", "--ce-contexts", "4", "--device", "cpu") == 0
    result = json.loads((layout.train_dir(run, name) / "eval.json").read_text())
    for sid in ids:
        r = result["saes"][sid]
        assert 0 < r["overall"]["fvu"] < 1
        for m in r["per_key"].values():
            assert m["ce_zero"] is not None and m["kl_sae"] >= 0 and "ce_loss_recovered" in m

    saes = load_saes(run, name)
    sae = saes[ids[0]]
    from activations.reader import open_run
    store = open_run(run)
    key = sae.cfg.in_keys[0]
    x = torch.cat([torch.from_numpy(store.read_rows(k, list(range(100, 164)))) for k in sae.cfg.in_keys], 1) \
        if mode == "crosscoder" else torch.from_numpy(store.read_rows(key, list(range(100, 164))))
    kw = {"key": key} if mode == "multilayer" else {}
    f = sae.encode(x, **kw)
    assert f.shape == (64, sae.cfg.n_latents) and (f >= 0).all() and ((f > 0).sum(1) <= 8).all()
    assert sae.decode(f, **kw).shape == (64, sae.cfg.d_out)
    assert sae.W_dec.shape == (sae.cfg.n_latents, sae.cfg.d_out)
    y = torch.from_numpy(store.read_rows(sae.cfg.out_keys[0], list(range(100, 164)))) if mode == "transcoder" else x
    with torch.no_grad():
        rel = float(((sae.reconstruct(x, **kw) - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    assert rel < 1.0  # raw-unit reconstruction beats the mean


@pytest.mark.parametrize("arch", ["relu", "batchtopk", "jumprelu", "matryoshka"])
def test_other_architectures_train_on_a_harvest(run, arch):
    assert strata("train", run, "--arch", arch, "--layers", "1", "--epochs", "2", "--log-every", "10", *FAST) == 0
    sae = load_saes(run, f"{arch}-layer")["resid.1"]
    assert sae.cfg.arch == arch
    records = [json.loads(ln)["saes"]["resid.1"] for ln in layout.metrics_path(run, f"{arch}-layer").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]


def _train_cmd(run, *extra):
    return [sys.executable, "-m", "strata.cli", "train", str(run), "--name", "r", "--epochs", "2", "--batch-size", "64", "--layers", "0,3",
            "--expansion", "4", "--k", "8", "--progress", "false", "--device", "cpu", "--checkpoint-every", "3", *extra]


def test_killed_run_resumes_to_identical_weights(run, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_train_cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = layout.checkpoint_dir(run, "r") / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 30:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads((layout.checkpoint_dir(run, "r") / "state.json").read_text())
    assert not killed_at["done"] and killed_at["step"] < killed_at["total_steps"]

    assert subprocess.run(_train_cmd(run, "--resume"), env=env, capture_output=True, check=False).returncode == 0
    assert subprocess.run(_train_cmd(ref), env=env, capture_output=True, check=False).returncode == 0
    for sid in ("resid.0", "resid.3"):
        a = load_file(str(layout.checkpoint_dir(run, "r") / "saes" / sid / "sae.safetensors"))
        b = load_file(str(layout.checkpoint_dir(ref, "r") / "saes" / sid / "sae.safetensors"))
        for k in b:
            assert torch.equal(a[k], b[k]), (sid, k)
    steps = [json.loads(ln)["step"] for ln in layout.metrics_path(run, "r").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated records after the resume


def test_resume_with_a_changed_config_lists_the_differences(run, capsys):
    assert strata("train", run, "--name", "c", "--layers", "0", *FAST) == 0
    assert strata("train", run, "--name", "c", "--layers", "0", *FAST[:-4], "--k", "4", "--lr", "0.01", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "k: 8 -> 4" in err and "lr: None -> 0.01" in err


def test_wandb_offline_needs_no_network(run):
    assert strata("train", run, "--name", "w", "--layers", "0", "--log-every", "5", *FAST,
                  "--wandb-project", "strata-test", "--wandb-mode", "offline") == 0
    wandb_dir = layout.train_dir(run, "w") / "wandb"
    assert any(p.name.startswith("offline-run") for p in wandb_dir.iterdir())
    assert layout.metrics_path(run, "w").read_text().strip()


def _corrupt_shard(run, key, shard=2):
    path = layout.acts_shard_path(run, key, shard)
    path.write_bytes(b"not an hdf5 file" * 10)
    return path


def _nan_shard(run, key, shard=2):
    """NaN rows behind valid chunk checksums (as if a harvest had stored them), so the trainer's own check speaks."""
    import h5py
    import numpy as np

    from activations.shards import CHUNK_SUMS, rows_hash
    with h5py.File(layout.acts_shard_path(run, key, shard), "r+") as f:
        f["acts"][:] = float("nan")
        step = f["acts"].chunks[0]
        f[CHUNK_SUMS][:] = np.array([rows_hash(f["acts"][a:a + step]) for a in range(0, len(f["acts"]), step)], np.uint64)


@pytest.mark.parametrize("case,args,expect", [
    ("missing layer", ["--layers", "7"], "layer 7 does not exist"),
    ("missing site", ["--sites", "attn_out"], "no attn_out activations"),
    ("k too large", ["--k", "128", "--expansion", "4"], "k=128"),
    ("zero lr", ["--lr", "0"], "lr='0' is not a valid float > 0"),
    ("negative lr", ["--lr", "-1e-3"], "lr='-1e-3' is not a valid float > 0"),
    ("width mismatch", ["--d-model", "64"], "does not match the shards' width 32"),
    ("corrupt shard", [], "shard-00002.h5"),
    ("nan in shards", [], "resid.1 contain NaN"),
    ("nan loss", ["--lr", "1e38", "--checkpoint-every", "1"], "at step"),
])
def test_bad_input_gives_one_line_and_leaves_no_partial_checkpoint(run, capsys, case, args, expect):
    if case == "corrupt shard":
        _corrupt_shard(run, "resid.1")
    if case == "nan in shards":
        _nan_shard(run, "resid.1")
    base = ["--batch-size", "256", "--progress", "false", "--device", "cpu", "--name", "bad"]
    if "--k" not in args:
        base += ["--k", "8"]
    assert strata("train", run, *base, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("strata: error:"), err
    assert expect in err, err
    ckpt = layout.checkpoint_dir(run, "bad")
    assert not ckpt.with_name("checkpoint.partial").exists()
    if case == "nan loss" and ckpt.exists():  # the last good checkpoint is kept and is finite
        state = json.loads((ckpt / "state.json").read_text())
        assert f"step {state['step']}" in err
        for sid in state["sae_ids"]:
            assert torch.isfinite(load_sae(ckpt / "saes" / sid).W_dec).all()
    elif case != "nan loss":
        assert not layout.train_dir(run, "bad").exists()  # nothing at all: a plain rerun works


def test_saelens_export_and_import_round_trip(run, tmp_path):
    from activations.reader import open_run

    assert strata("train", run, "--name", "e", "--layers", "1,2", *FAST) == 0
    out = tmp_path / "exported"
    assert strata("export", run, "--name", "e", "--format", "saelens", "--out", out) == 0
    assert strata("export", run, "--name", "e", "--format", "saelens", "--out", out) == 0  # replaces its own folders
    assert sorted(p.name for p in out.iterdir()) == ["resid.1", "resid.2"]
    folder = out / "resid.2"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 32 and cfg["d_sae"] == 128 and cfg["k"] == 8
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_pre"
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (32, 128) and w["W_dec"].shape == (128, 32)
    assert load_file(str(folder / "sparsity.safetensors"))["sparsity"].shape == (128,)

    x = torch.from_numpy(open_run(run).read_rows("resid.2", list(range(200, 300))))
    ours = load_saes(run, "e")["resid.2"]
    # SAELens' own encode, written from its definition: topk(relu((x - b_dec) W_enc + b_enc))
    pre = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    vals, idx = pre.topk(8, dim=1)
    theirs = torch.zeros_like(pre).scatter(1, idx, vals)
    assert torch.allclose(ours.encode(x), theirs, atol=1e-5)

    assert strata("import", run, folder, "--name", "imported") == 0
    back = load_saes(run, "imported")["resid.2"]
    assert torch.allclose(back.encode(x), ours.encode(x), atol=1e-5)
    assert torch.allclose(back.reconstruct(x), ours.reconstruct(x), atol=1e-5)
    assert strata("eval", run, "--name", "imported", "--batch-size", "256", "--ce-contexts", "0", "--device", "cpu") == 0


def test_saelens_loads_the_export_when_installed(run, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from activations.reader import open_run

    for arch in ("topk", "batchtopk", "jumprelu", "relu"):
        assert strata("train", run, "--arch", arch, "--layers", "1", *FAST) == 0
        assert strata("export", run, "--name", f"{arch}-layer", "--out", tmp_path / arch) == 0
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / arch / "resid.1"))
        ours = load_saes(run, f"{arch}-layer")["resid.1"]
        x = torch.from_numpy(open_run(run).read_rows("resid.1", list(range(200))))
        with torch.no_grad():
            assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5), arch


def test_import_refuses_a_mismatched_width(run, tmp_path, capsys):
    assert strata("train", run, "--name", "e", "--layers", "1", *FAST) == 0
    assert strata("export", run, "--name", "e", "--out", tmp_path / "x") == 0
    cfg_path = tmp_path / "x" / "resid.1" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["d_in"] = 64
    cfg_path.write_text(json.dumps(cfg))
    assert strata("import", run, tmp_path / "x" / "resid.1", "--name", "imp") == 2
    err = capsys.readouterr().err
    assert "d_in=64" in err and "(32, 128)" in err  # the cfg.json contradicts its own weights
    assert not layout.train_dir(run, "imp").exists()


def test_yaml_config_with_cli_overrides_and_bf16(run, tmp_path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("arch: batchtopk\nk: 4\nexpansion: 2\nbf16: true\nlayers: '2'\nbatch_size: 256\n")
    assert strata("train", run, "--config", cfg_file, "--k", "6", "--name", "y", "--progress", "false", "--device", "cpu") == 0
    saved = json.loads((layout.train_dir(run, "y") / "config.json").read_text())["identity"]
    assert saved["arch"] == "batchtopk" and saved["k"] == 6 and saved["bf16"] is True and saved["expansion"] == 2
    sae = load_saes(run, "y")["resid.2"]
    assert sae.cfg.k == 6 and sae.cfg.n_latents == 64 and float(sae.threshold) > 0


# ---------------------------------------------------------------- what train may delete, locks, read-only runs
def tree(folder: Path) -> dict:
    """Every file's bytes under folder (the lock files Strata keeps in a run are not content)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".strata.lock" and p.parent.name != ".locks"}


def test_overwrite_replaces_only_a_strata_training_folder(run, capsys):
    from activations.ownership import owner_kind

    assert strata("train", run, "--name", "o", "--layers", "0", *FAST) == 0
    assert owner_kind(layout.train_dir(run, "o")) == "train"
    first = load_saes(run, "o")["resid.0"].W_dec.clone()
    assert strata("train", run, "--name", "o", "--layers", "0", "--seed", "5", "--overwrite", *FAST) == 0
    assert not torch.equal(load_saes(run, "o")["resid.0"].W_dec, first), "retrained"

    # a Strata 0.1 training folder has no marker: recognised by its config.json's identity
    (layout.train_dir(run, "o") / ".strata-owned").unlink()
    assert strata("train", run, "--name", "o", "--layers", "0", "--overwrite", *FAST) == 0

    mine = layout.train_dir(run, "notes")
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "obs.csv").write_text("a,b\n")
    (mine / "config.json").write_text('{"my": "settings"}')
    before = tree(run)
    assert strata("train", run, "--name", "notes", "--layers", "0", "--overwrite", *FAST) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "nothing was changed" in err
    assert tree(run) == before


def test_a_training_in_progress_locks_its_name(run, capsys):
    from activations.lock import run_lock

    assert strata("train", run, "--name", "busy", "--layers", "0", *FAST) == 0
    before = tree(layout.train_dir(run, "busy"))
    with run_lock(run, "strata train --name busy", scope="train-busy"):  # as a running `strata train` holds it
        assert strata("train", run, "--name", "busy", "--layers", "0", "--overwrite", *FAST) == 2
        assert "in use by `strata train --name busy`" in capsys.readouterr().err
        assert strata("eval", run, "--name", "busy", "--ce-contexts", "0", "--device", "cpu") == 2
        assert "in use" in capsys.readouterr().err
        assert strata("train", run, "--name", "other", "--layers", "0", *FAST) == 0  # other names train meanwhile
    assert tree(layout.train_dir(run, "busy")) == before


def _read_only(folder: Path):
    """Make a folder unwritable, even for root (chattr +i); returns the undo."""
    import os

    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: cannot make a folder read-only")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_train_folder_gives_one_line_and_leaves_nothing(run, capsys):
    (run / "train").mkdir()
    undo = _read_only(run / "train")
    try:
        assert strata("train", run, "--name", "ro", "--layers", "0", *FAST) == 2
    finally:
        undo()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write {layout.train_dir(run, 'ro')}" in err, err
    assert not layout.train_dir(run, "ro").exists()


def test_early_failure_leaves_no_folder_it_created(run, capsys):
    _corrupt_shard(run, "resid.1")
    assert not (run / "train").exists()
    assert strata("train", run, "--name", "early", "--layers", "1", *FAST) == 2
    assert "shard-00002.h5" in capsys.readouterr().err
    assert not (run / "train").exists(), "neither train/early nor the train/ it made is left behind"


def test_exclude_first_is_checked_against_the_context(run, capsys):
    assert strata("train", run, "--name", "x", "--exclude-first", "500", *FAST) == 2
    err = capsys.readouterr().err
    assert "below the run's context length (32 tokens)" in err and "all zero" not in err
    assert not (run / "train").exists()
