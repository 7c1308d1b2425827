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
HARVEST_CASES: list[Case] = [
]


# ---------------------------------------------------------------- train / eval / resume from damaged files
TRAIN_CASES: list[Case] = [
]


# ---------------------------------------------------------------- import / export (SAELens folders)
INTEROP_CASES: list[Case] = [
]


# ---------------------------------------------------------------- analyze / dashboard / share
def _user_files(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("a user's own file\n")


DASHBOARD_CASES: list[Case] = [
    Case("share-into-user-folder", lambda w: ["share", w.analyzed, "--out", w.user, "--features", "top:2"],
         "did not write"),
    Case("share-onto-a-file", lambda w: ["share", w.analyzed, "--out", w.root / "cases/share-onto-a-file/report.html"],
         "existing file", setup=lambda w, tmp: (tmp / "report.html").write_text("<p>my report</p>")),
    Case("share-beside-user-partial", lambda w: ["share", w.analyzed, "--out", w.root / "cases/share-beside-user-partial/B"],
         "did not write", setup=lambda w, tmp: _user_files(tmp / "B.partial")),
    Case("share-beside-user-old", lambda w: ["share", w.analyzed, "--out", w.root / "cases/share-beside-user-old/B"],
         "did not write", setup=lambda w, tmp: _user_files(tmp / "B.old")),
    Case("share-under-a-file", lambda w: ["share", w.analyzed, "--out", w.root / "cases/share-under-a-file/f.txt/B"],
         "is a file", setup=lambda w, tmp: (tmp / "f.txt").write_text("text")),
    Case("share-onto-a-symlink", lambda w: ["share", w.analyzed, "--out", w.root / "cases/share-onto-a-symlink/link"],
         "symbolic link", setup=lambda w, tmp: (tmp / "link").symlink_to(w.user, target_is_directory=True)),
    Case("share-over-the-index", lambda w: ["share", w.analyzed, "--out", w.analyzed / "index"], "did not write"),
    Case("share-over-the-run", lambda w: ["share", w.analyzed, "--out", w.analyzed], "did not write"),
    Case("share-feature-out-of-range", lambda w: ["share", w.analyzed, "--features", "99999"], "does not exist"),
    Case("share-feature-range-backwards", lambda w: ["share", w.analyzed, "--features", "5-2"], "backwards"),
    Case("share-sae-without-features", lambda w: ["share", w.analyzed, "--features", "resid.0:"], "no features listed"),
    Case("share-features-empty", lambda w: ["share", w.analyzed, "--features", ""], "--features is empty"),
    Case("dashboard-port-out-of-range", lambda w: ["dashboard", w.analyzed, "--port", "70000"], "1-65535"),
    Case("dashboard-port-zero", lambda w: ["dashboard", w.analyzed, "--port", "0"], "1-65535"),
    Case("dashboard-unknown-host", lambda w: ["dashboard", w.analyzed, "--host", "no-such-host.invalid"],
         "not an address of this machine"),
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
