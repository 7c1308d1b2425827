"""Bad input, typed as a user would: every case must give one `strata: error:` line naming the problem and
the fix, exit status 2, and leave the whole tree (the user's own files beside the run included) byte-for-byte
unchanged. Each section below lists the cases of one part of Strata; `test_refused` runs them all.

A case is `Case(id, argv, match)`: `argv(ws)` builds the command line from the workspace `ws` (see `Workspace`),
`match` is a substring the error line must contain (what is wrong, or the fix). `setup(ws, tmp)`, when given,
prepares case-private files under `tmp` (inside the snapshot) before the snapshot is taken.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from strata.cli import main

FAST = ["--batch-size", "256", "--expansion", "4", "--k", "8", "--progress", "false", "--device", "cpu"]


@dataclass
class Workspace:
    root: Path      # everything below is snapshotted around each case
    run: Path       # a harvest of the tiny Llama (resid 0-3, mlp_in/mlp_out 0-2), with training run "t1" (TopK bank)
    model: Path     # the tiny Llama's folder (config, safetensors, tokenizer)
    user: Path      # a user's own folder with files Strata must never touch
    export: Path    # a SAELens export of t1's resid.1 SAE (cfg.json + weights)
    analyzed: Path  # a run with trained SAEs and a feature index (for analyze / share / dashboard cases)


@dataclass
class Case:
    id: str
    argv: Callable[[Workspace], list]
    match: str
    setup: Callable[[Workspace, Path], None] | None = None


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_run, tiny_llama, analyzed_run) -> Workspace:
    root = tmp_path_factory.mktemp("bad-input")
    run = root / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train", "index", "share", ".locks", ".strata.lock"))
    assert main(["train", str(run), "--name", "t1", "--max-tokens", "1024", *FAST]) == 0
    export = root / "exported"
    assert main(["export", str(run), "--name", "t1", "--out", str(export), "--sae", "resid.1"]) == 0
    user = root / "my-notes"
    (user / "data").mkdir(parents=True)
    (user / "notes.txt").write_text("three weeks of observations\n")
    (user / "data" / "table.csv").write_text("a,b\n1,2\n")
    (run / "README-mine.txt").write_text("a file the user keeps inside the run\n")
    analyzed = root / "analyzed"
    shutil.copytree(analyzed_run, analyzed, ignore=shutil.ignore_patterns(".locks", ".strata.lock"))
    return Workspace(root=root, run=run, model=tiny_llama, user=user, export=next(export.rglob("cfg.json")).parent,
                     analyzed=analyzed)


def tree_state(root: Path) -> dict:
    """Every file's bytes (as a hash) and every folder under root; lock files Strata keeps are not content."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        state[str(rel) + "/"] = "dir"
        for f in filenames:
            if f == ".strata.lock" or Path(dirpath).name == ".locks":
                continue
            p = Path(dirpath) / f
            state[str(rel / f)] = hashlib.sha256(p.read_bytes()).hexdigest() if not p.is_symlink() else os.readlink(p)
    state.pop(".locks/", None)
    return {k: v for k, v in state.items() if not k.endswith(".locks/")}


def run_cli(argv: list, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- flags, config files, --help (strata/config.py, cli)
CONFIG_CASES: list[Case] = [
]


# ---------------------------------------------------------------- run directories, names, ownership, locks
DATA_LOSS_CASES: list[Case] = [
    Case("train-name-dotdot", lambda w: ["train", w.run, "--name", "..", "--overwrite", *FAST], "not allowed"),
    Case("train-name-escapes", lambda w: ["train", w.run, "--name", "../../other", "--overwrite", *FAST], "not allowed"),
    Case("eval-name-slash", lambda w: ["eval", w.run, "--name", "a/b"], "not allowed"),
    Case("export-over-user-files", lambda w: ["export", w.run, "--name", "t1", "--out", w.root / "cases/export-over-user-files/E",
                                              "--sae", "resid.1"], "did not write",
         setup=lambda w, tmp: (tmp / "E/resid.1").mkdir(parents=True) or (tmp / "E/resid.1/mine.txt").write_text("mine")),
]


# ---------------------------------------------------------------- harvest, verify, corpus and model files
HARVEST = ["--layers", "1", "--context", "32", "--max-tokens", "256", "--progress", "false"]


def _harvest_into(folder: str, *extra):
    """`strata harvest` into ws.root/cases/<folder> (a case's private folder) with the tiny Llama."""
    return lambda w: ["harvest", w.root / "cases" / folder, "--model", w.model, *HARVEST, *extra]


def _shards_without_manifest(*extra_dirs):
    """Setup: tmp/R holds a run's tokens/ and acts/resid.1/ (and `extra_dirs`, each with a file) but no manifest."""
    def setup(w, tmp):
        shutil.copytree(w.run / "tokens", tmp / "R" / "tokens")
        shutil.copytree(w.run / "acts" / "resid.1", tmp / "R" / "acts" / "resid.1")
        for d in extra_dirs:
            (tmp / "R" / d).mkdir(parents=True)
            (tmp / "R" / d / "kept.bin").write_bytes(b"a week of training")
    return setup


def _run_copy_with(*extra_dirs, manifest: bytes | None = None):
    """Setup: tmp/R is a complete run (manifest and shards, no trainings) plus `extra_dirs`, each with a file."""
    def setup(w, tmp):
        shutil.copytree(w.run, tmp / "R", ignore=shutil.ignore_patterns("train", ".locks", ".strata.lock"))
        if manifest is not None:
            (tmp / "R" / "manifest.json").write_bytes(manifest)
        for d in extra_dirs:
            (tmp / "R" / d).mkdir(parents=True)
            (tmp / "R" / d / "kept.bin").write_bytes(b"made from these activations")
    return setup


def _user_folder(*dirs):
    """Setup: tmp/U is a user's own folder: data.csv, plus `dirs` (names Strata also uses) holding their files."""
    def setup(w, tmp):
        (tmp / "U").mkdir()
        (tmp / "U" / "data.csv").write_text("a,b\n1,2\n")
        for d in dirs:
            (tmp / "U" / d).mkdir()
            (tmp / "U" / d / "notes.txt").write_text("mine\n")
    return setup


HARVEST_CASES: list[Case] = [
    # a run whose manifest.json is gone: shards and trainings are kept, whatever the flags
    Case("harvest-no-manifest-bad-layers", _harvest_into("harvest-no-manifest-bad-layers/R", "--layers", "99"),
         "no manifest.json", setup=_shards_without_manifest("train/mine")),
    Case("harvest-no-manifest-resume", _harvest_into("harvest-no-manifest-resume/R", "--resume"), "put it back",
         setup=_shards_without_manifest("train/mine")),
    Case("harvest-no-manifest-overwrite", _harvest_into("harvest-no-manifest-overwrite/R", "--overwrite"),
         "no manifest.json", setup=_shards_without_manifest("train/mine")),
    Case("harvest-no-manifest-plain", _harvest_into("harvest-no-manifest-plain/R"), "acts/, tokens/",
         setup=_shards_without_manifest()),
    Case("harvest-index-left-without-run", _harvest_into("harvest-index-left-without-run/R"), "index/",
         setup=lambda w, tmp: (tmp / "R" / "index").mkdir(parents=True) or (tmp / "R" / "index" / "t1.h5").write_bytes(b"i")),
    Case("harvest-share-left-without-run", _harvest_into("harvest-share-left-without-run/R", "--overwrite"), "share/",
         setup=lambda w, tmp: (tmp / "R" / "share").mkdir(parents=True) or (tmp / "R" / "share" / "index.html").write_text("x")),
    Case("verify-shards-without-manifest", lambda w: ["verify", w.root / "cases" / "verify-shards-without-manifest" / "R"],
         "put it back", setup=_shards_without_manifest()),
    # --overwrite replaces only what a harvest wrote, and never while trainings, indexes, bundles or sweeps use it
    Case("harvest-overwrite-run-with-training", lambda w: ["harvest", w.run, "--model", w.model, *HARVEST, "--overwrite"],
         "train/t1"),
    Case("harvest-overwrite-analyzed-run", lambda w: ["harvest", w.analyzed, "--model", w.model, *HARVEST, "--overwrite"],
         "move or delete those yourself"),
    Case("harvest-overwrite-run-with-sweeps", _harvest_into("harvest-overwrite-run-with-sweeps/R", "--overwrite"),
         "sweeps/s1", setup=_run_copy_with("sweeps/s1")),
    Case("harvest-overwrite-run-with-share", _harvest_into("harvest-overwrite-run-with-share/R", "--overwrite"),
         "share", setup=_run_copy_with("share")),
    Case("harvest-overwrite-broken-manifest-with-training",
         _harvest_into("harvest-overwrite-broken-manifest-with-training/R", "--overwrite"), "train/t",
         setup=_run_copy_with("train/t", manifest=b"{ not json")),
    # a user's folder given as the run: never written into or cleared
    Case("harvest-overwrite-user-folder-with-acts", _harvest_into("harvest-overwrite-user-folder-with-acts/U", "--overwrite"),
         "no manifest.json", setup=_user_folder("acts")),
    Case("harvest-user-folder-named-train", _harvest_into("harvest-user-folder-named-train/U"), "no manifest.json",
         setup=lambda w, tmp: (tmp / "U" / "train").mkdir(parents=True) or (tmp / "U" / "train" / "notes.txt").write_text("x")),
    Case("harvest-overwrite-user-folder", lambda w: ["harvest", w.user, "--model", w.model, *HARVEST, "--overwrite"],
         "new or empty folder"),
]


# ---------------------------------------------------------------- train / eval / resume from damaged files
TRAIN_CASES: list[Case] = [
]


# ---------------------------------------------------------------- import / export (SAELens folders)
INTEROP_CASES: list[Case] = [
]


# ---------------------------------------------------------------- analyze / dashboard / share
DASHBOARD_CASES: list[Case] = [
]


ALL_CASES = CONFIG_CASES + DATA_LOSS_CASES + HARVEST_CASES + TRAIN_CASES + INTEROP_CASES + DASHBOARD_CASES


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_refused(case: Case, ws: Workspace, tmp_path_factory, capsys):
    tmp = ws.root / "cases" / case.id
    tmp.mkdir(parents=True, exist_ok=True)
    if case.setup:
        case.setup(ws, tmp)
    before = tree_state(ws.root)
    code, err = run_cli(case.argv(ws), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("strata: error: "), f"not one error line:\n{err}"
    assert case.match.lower() in lines[0].lower(), lines[0]
    assert tree_state(ws.root) == before, "the command changed files although it refused"


def test_there_are_enough_cases():
    assert len({c.id for c in ALL_CASES}) == len(ALL_CASES), "case ids must be unique"
    assert len(ALL_CASES) >= 60
