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
def _case_dir(w: Workspace, case_id: str) -> Path:
    return w.root / "cases" / case_id


def _run_copy(w: Workspace, tmp: Path) -> Path:
    """A private copy of the workspace run (with training run t1) to damage."""
    dest = tmp / "run"
    shutil.copytree(w.run, dest, ignore=shutil.ignore_patterns(".locks", ".strata.lock"))
    return dest


def _damage_run(rel: str, data: bytes) -> Callable[[Workspace, Path], None]:
    """Setup: copy the run, then replace the file at `rel` (inside the run) with `data`."""
    def setup(w: Workspace, tmp: Path) -> None:
        (_run_copy(w, tmp) / rel).write_bytes(data)
    return setup


def _user_thing_at(rel: str, kind: str) -> Callable[[Workspace, Path], None]:
    """Setup: copy the run and put a user's folder, file, link or another Strata output at `rel`."""
    def setup(w: Workspace, tmp: Path) -> None:
        target = _run_copy(w, tmp) / rel
        if kind == "folder":
            (target / "data").mkdir(parents=True)
            (target / "data" / "obs.csv").write_text("a,b\n1,2\n")
            (target / "config.json").write_text('{"mine": true}')
        elif kind == "file":
            target.write_text("my notes\n")
        elif kind == "link":
            target.symlink_to(w.user, target_is_directory=True)
        elif kind == "share":
            target.mkdir()
            (target / ".strata-owned").write_text('{"written_by": "strata", "kind": "share"}\n')
            (target / "index.html").write_text("<html></html>")
    return setup


def _bad_optimizer(w: Workspace, tmp: Path) -> None:
    """Setup: a readable optimizer.safetensors whose moments do not fit the SAEs' parameters."""
    import torch
    from safetensors.torch import save_file

    run = _run_copy(w, tmp)
    save_file({"resid.0/0/exp_avg": torch.zeros(3), "resid.0/0/exp_avg_sq": torch.zeros(3), "resid.0/0/step": torch.ones(())},
              str(run / "train/t1/checkpoint/optimizer.safetensors"))


RESUME_T1 = ["--name", "t1", "--max-tokens", "1024", *FAST, "--resume"]
CKPT = "train/t1/checkpoint"


def _tcase(case_id: str, argv_tail: list, match: str, setup) -> Case:
    """A case on the private run copy: `strata <argv_tail with RUN replaced by the copy>`."""
    return Case(case_id, lambda w: [a if a != "RUN" else _case_dir(w, case_id) / "run" for a in argv_tail], match, setup)


TRAIN_CASES: list[Case] = [
    _tcase("train-overwrite-user-folder", ["train", "RUN", "--name", "mine", "--overwrite", *FAST], "did not write",
           _user_thing_at("train/mine", "folder")),
    _tcase("train-overwrite-other-strata-output", ["train", "RUN", "--name", "site", "--overwrite", *FAST],
           "not a training run", _user_thing_at("train/site", "share")),
    _tcase("train-overwrite-user-file", ["train", "RUN", "--name", "notes.txt", "--overwrite", *FAST], "existing file",
           _user_thing_at("train/notes.txt", "file")),
    _tcase("train-overwrite-symlink-to-user-folder", ["train", "RUN", "--name", "link", "--overwrite", *FAST],
           "symbolic link", _user_thing_at("train/link", "link")),
    Case("train-exclude-first-beyond-context", lambda w: ["train", w.run, "--name", "ef", "--exclude-first", "500", *FAST],
         "below the run's context length (32"),
    Case("train-exclude-first-negative", lambda w: ["train", w.run, "--name", "ef", "--exclude-first", "-3", *FAST],
         "--exclude-first -3 must be at least 0"),
    _tcase("train-resume-corrupt-state", ["train", "RUN", *RESUME_T1], "state.json is unreadable",
           _damage_run(f"{CKPT}/state.json", b'{"step": 4, "tok')),
    _tcase("train-resume-state-without-fields", ["train", "RUN", *RESUME_T1], "state.json is unreadable",
           _damage_run(f"{CKPT}/state.json", b"{}")),
    _tcase("train-resume-corrupt-optimizer", ["train", "RUN", *RESUME_T1], "optimizer.safetensors is unreadable",
           _damage_run(f"{CKPT}/optimizer.safetensors", b"\x00" * 64)),
    _tcase("train-resume-optimizer-of-other-shapes", ["train", "RUN", *RESUME_T1], "do not match its parameters",
           _bad_optimizer),
    _tcase("train-resume-corrupt-config", ["train", "RUN", *RESUME_T1], "config.json is unreadable",
           _damage_run("train/t1/config.json", b'{"identity": {"arch": "to')),
    _tcase("train-resume-config-is-a-list", ["train", "RUN", *RESUME_T1], "retrain with --overwrite",
           _damage_run("train/t1/config.json", b"[]")),
    _tcase("eval-corrupt-config", ["eval", "RUN", "--name", "t1", "--ce-contexts", "0", "--device", "cpu"],
           "config.json is unreadable", _damage_run("train/t1/config.json", b"\xff\xfe not json")),
    _tcase("eval-config-is-a-list", ["eval", "RUN", "--name", "t1", "--ce-contexts", "0", "--device", "cpu"],
           "config.json is unreadable", _damage_run("train/t1/config.json", b"[1, 2]")),
    _tcase("eval-corrupt-state", ["eval", "RUN", "--name", "t1", "--ce-contexts", "0", "--device", "cpu"],
           "state.json is unreadable", _damage_run(f"{CKPT}/state.json", b"garbage")),
    Case("eval-exclude-first-beyond-context", lambda w: ["eval", w.run, "--name", "t1", "--exclude-first", "500",
                                                         "--ce-contexts", "0", "--device", "cpu"],
         "below the run's context length (32"),
]


# ---------------------------------------------------------------- import / export (SAELens folders)
def _saelens_copy(edit_cfg=None, edit_weights=None, extra_file: tuple | None = None):
    """Setup: a copy of the exported SAELens folder at tmp/sae, its cfg.json / weights edited."""
    def setup(w: Workspace, tmp: Path) -> None:
        from safetensors.torch import load_file, save_file

        folder = tmp / "sae"
        shutil.copytree(w.export, folder)
        if edit_cfg is not None:
            cfg = json.loads((folder / "cfg.json").read_text())
            (folder / "cfg.json").write_text(json.dumps(edit_cfg(cfg)))
        if edit_weights is not None:
            weights = load_file(str(folder / "sae_weights.safetensors"))
            save_file(edit_weights(weights), str(folder / "sae_weights.safetensors"))
        if extra_file is not None:
            (folder / extra_file[0]).write_bytes(extra_file[1])
    return setup


def _with(**fields):
    return lambda cfg: {**cfg, **fields}


def _without(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _nan_encoder(weights):
    weights["W_enc"][0, 0] = float("nan")
    return weights


def _icase(case_id: str, match: str, setup, *flags) -> Case:
    """`strata import RUN tmp/sae --name <id>` on the workspace run."""
    return Case(case_id, lambda w: ["import", w.run, _case_dir(w, case_id) / "sae", "--name", case_id, *flags], match, setup)


def _user_export_target(sub: str):
    def setup(w: Workspace, tmp: Path) -> None:
        (tmp / "E" / sub).mkdir(parents=True)
        (tmp / "E" / sub / "mine.txt").write_text("mine")
    return setup


INTEROP_CASES: list[Case] = [
    _icase("import-cfg-without-d_in", "has no d_in", _saelens_copy(_without("d_in"))),
    _icase("import-cfg-is-a-list", "holds a JSON list", _saelens_copy(lambda cfg: [cfg])),
    _icase("import-d_in-not-a-number", "not a whole number", _saelens_copy(_with(d_in="thirty-two"))),
    _icase("import-d_sae-contradicts-weights", "d_sae=99", _saelens_copy(_with(d_sae=99))),
    _icase("import-jumprelu-without-threshold", "has no threshold tensor", _saelens_copy(_with(architecture="jumprelu"))),
    _icase("import-weights-without-b_dec", "has no b_dec tensor", _saelens_copy(edit_weights=_without("b_dec"))),
    _icase("import-W_dec-wrong-shape", "W_dec is torch.float32 (128, 16)",
           _saelens_copy(edit_weights=lambda wt: {**wt, "W_dec": wt["W_dec"][:, :16].contiguous()})),
    _icase("import-nan-weights", "W_enc contains NaN", _saelens_copy(edit_weights=_nan_encoder)),
    _icase("import-k-beyond-d_sae", "fix k in that file", _saelens_copy(_with(k=1000))),
    _icase("import-layer-norm", "not a linear map", _saelens_copy(_with(normalize_activations="layer_norm"))),
    _icase("import-constant-norm-rescale", "not a linear map",
           _saelens_copy(_with(normalize_activations="constant_norm_rescale"))),
    _icase("import-expected-average-without-scaler", "no activation_scaler.json",
           _saelens_copy(_with(normalize_activations="expected_average_only_in"))),
    _icase("import-unknown-normalization", "is not one of none", _saelens_copy(_with(normalize_activations="l2"))),
    _icase("import-hook-z-reshaping", "reshape_activations", _saelens_copy(_with(reshape_activations="hook_z"))),
    _icase("import-apply-b-dec-not-a-bool", "apply_b_dec_to_input='yes' is not true or false",
           _saelens_copy(_with(apply_b_dec_to_input="yes"))),
    _icase("import-corrupt-sparsity", "sparsity.safetensors", _saelens_copy(extra_file=("sparsity.safetensors", b"junk"))),
    Case("export-over-user-partial", lambda w: ["export", w.run, "--name", "t1", "--sae", "resid.1", "--out",
                                                _case_dir(w, "export-over-user-partial") / "E"],
         "did not write", setup=_user_export_target("resid.1.partial")),
    Case("export-user-folder-among-several", lambda w: ["export", w.run, "--name", "t1", "--out",
                                                        _case_dir(w, "export-user-folder-among-several") / "E"],
         "did not write", setup=_user_export_target("resid.3")),
    Case("export-out-is-a-file", lambda w: ["export", w.run, "--name", "t1", "--out", w.user / "notes.txt"],
         "is a file, not a folder"),
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
