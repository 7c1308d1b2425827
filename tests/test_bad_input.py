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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    for dirpath, _dirnames, filenames in os.walk(root):
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
def with_file(id_: str, argv: Callable[[Workspace], list], name: str, content: str | bytes, match: str) -> Case:
    """A case whose command line ends with `--config <case folder>/<name>`, the file holding `content`."""
    def setup(w: Workspace, tmp: Path) -> None:
        (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return Case(id_, lambda w: [*argv(w), "--config", w.root / "cases" / id_ / name], match, setup)


def _train(name: str, flags: list = FAST) -> Callable[[Workspace], list]:
    return lambda w: ["train", w.run, "--name", name, *flags]


FEW = ["--expansion", "4", "--progress", "false", "--device", "cpu"]  # k and batch_size come from the file


CONFIG_CASES: list[Case] = [
    # flags: a wrong type names the flag, the field, the value and what it takes (not "invalid <lambda> value")
    Case("flag-int-fractional", lambda w: [*_train("c-frac")(w), "--k", "32.5"], "--k: k='32.5' is not a valid int"),
    Case("flag-bool-garbage", lambda w: [*_train("c-bool")(w), "--bf16", "maybe"], "bf16='maybe' is not a valid bool"),
    Case("flag-negative-exclude-first", lambda w: [*_train("c-excl")(w), "--exclude-first", "-1"],
         "exclude_first='-1' is not a valid int >= 0"),
    Case("flag-negative-lr-exponent", lambda w: [*_train("c-lr")(w), "--lr", "-1e-3"], "lr='-1e-3' is not a valid float > 0"),
    Case("flag-bad-prefixes", lambda w: [*_train("c-pre")(w), "--arch", "matryoshka", "--matryoshka-prefixes", "16,abc"],
         "'abc' is not a positive integer"),
    Case("eval-negative-max-tokens", lambda w: ["eval", w.run, "--name", "t1", "--max-tokens", "-5", "--device", "cpu"],
         "max_tokens='-5' is not a valid int >= 0"),
    Case("analyze-min-link-out-of-range", lambda w: ["analyze", w.analyzed, "--min-link", "2", "--device", "cpu"],
         "min_link='2' is not a valid float >= -1 and <= 1"),
    # the explainer's allowed values are checked before any SAE or model is loaded (it took 15 s to refuse)
    Case("analyze-bogus-explainer", lambda w: ["analyze", w.analyzed, "--explainer", "bogus", "--device", "cpu"],
         "explainer='bogus' is not a valid choice (tokens, openai, transformers, none)"),
    # argparse's own errors: one line with the verb's --help, not a usage block
    Case("flag-unknown", lambda w: [*_train("c-unk")(w), "--nmae", "x"], "unrecognized arguments: --nmae x (see strata train --help)"),
    Case("flag-missing-value", lambda w: [*_train("c-miss")(w), "--k"], "argument --k: expected one argument"),
    Case("verb-typo", lambda w: ["trian", w.run], "invalid choice: 'trian'"),
    # config files: the same types and constraints as flags, the file named in the message
    with_file("file-fractional-k", _train("c-ffrac", FEW), "t.yaml", "k: 32.5\nbatch_size: 256\n", "t.yaml: k=32.5 is not a valid int"),
    with_file("file-bool-garbage", _train("c-fbool"), "t.yaml", "bf16: maybe\n", "bf16='maybe' is not a valid bool"),
    with_file("file-batch-size-text", _train("c-fbs", FEW), "t.json", '{"batch_size": "lots", "k": 8}', "batch_size='lots'"),
    with_file("file-negative-exclude-first", _train("c-fexcl"), "t.yaml", "exclude_first: -2\n", "exclude_first=-2"),
    with_file("file-layers-mapping", _train("c-flay"), "t.yaml", "layers: {first: 1}\n", "layers={'first': 1}"),
    with_file("file-unknown-site-in-list", _train("c-fsite"), "t.yaml", "sites: [resid, bogus]\n", "unknown site 'bogus'"),
    with_file("file-not-text", _train("c-fbin"), "t.yaml", b"\xff\xfe\x00k: 8", "is not valid YAML"),
    with_file("file-bad-wandb-mode", _train("c-fwb"), "t.yaml", "wandb_mode: sometimes\n",
              "wandb_mode='sometimes' is not a valid choice (online, offline, disabled)"),
    # eval takes --config like every run verb; its unknown fields are listed with the valid ones
    with_file("eval-config-unknown-field", lambda w: ["eval", w.run, "--name", "t1", "--device", "cpu"], "e.yaml",
              "ce_context: 4\n", "unknown EvalConfig field(s) ce_context; valid fields: "),
    with_file("eval-config-negative", lambda w: ["eval", w.run, "--name", "t1", "--device", "cpu"], "e.yaml",
              "ce_contexts: -4\n", "ce_contexts=-4 is not a valid int >= 0"),
    with_file("harvest-config-negative-context",
              lambda w: ["harvest", w.root / "cases/harvest-config-negative-context/new-run", "--model", w.model,
                         "--progress", "false"], "h.yaml", "context: -32\nlayers: [1, 2]\n", "context=-32"),
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


# ---------------------------------------------------------------- corpus files and model files given to harvest
def _harvest_case(case_id: str, flags: tuple, match: str, files: dict) -> Case:
    """`strata harvest` into a fresh run dir in the case's folder, which holds `files` ({relative path: bytes, or
    a callable(ws, path) writing it}); a flag value "@x" is the path of x there."""
    def argv(w: Workspace) -> list:
        tmp = w.root / "cases" / case_id
        given = [tmp / f[1:] if f.startswith("@") else f for f in flags]
        model = [] if "--model" in flags else ["--model", w.model]
        return ["harvest", tmp / "run", *model, *given, "--context", "32", "--max-tokens", "256",
                "--layers", "1", "--progress", "false", "--device", "cpu"]

    def setup(w: Workspace, tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            data(w, tmp / name) if callable(data) else (tmp / name).write_bytes(data)

    return Case(case_id, argv, match, setup)


def _model_without(*patterns):
    return lambda w, dest: shutil.copytree(w.model, dest, ignore=shutil.ignore_patterns(*patterns))


def _parquet(table: dict):
    def write(w: Workspace, dest: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(table, schema=pa.schema([(k, pa.string()) for k in table])), dest)
    return write


_PROSE = " ".join(f"word{i % 97}" for i in range(3000)).encode()
_NOISE = bytes((i * 151 + 7) % 256 for i in range(4096))  # deterministic bytes that are neither UTF-8 nor JSON
_GGUF_HEADER = b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little")  # version 3, 5 tensors, then noise

INPUT_CASES: list[Case] = [
    _harvest_case("gguf-garbage", ("--model", "@m.gguf"), "m.gguf is not a GGUF file", {"m.gguf": _NOISE}),
    _harvest_case("gguf-empty", ("--model", "@m.gguf"), "m.gguf is empty", {"m.gguf": b""}),
    _harvest_case("gguf-damaged", ("--model", "@m.gguf"), "cannot read GGUF file", {"m.gguf": _GGUF_HEADER + _NOISE}),
    _harvest_case("model-without-tokenizer", ("--model", "@m"), "has no tokenizer",
                  {"m": _model_without("tokenizer*", "special_tokens_map.json")}),
    _harvest_case("model-without-config", ("--model", "@m"), "no config.json", {"m": _model_without("config.json")}),
    _harvest_case("data-binary-jsonl", ("--data", "@c.jsonl"), "c.jsonl is not a readable JSON Lines file",
                  {"c.jsonl": _NOISE}),
    _harvest_case("data-binary-parquet", ("--data", "@c.parquet"), "c.parquet is not a readable Parquet file",
                  {"c.parquet": _PROSE}),
    _harvest_case("data-jsonl-not-objects", ("--data", "@c.jsonl"), "each line must be one JSON object",
                  {"c.jsonl": b"42\n43\n"}),
    _harvest_case("data-jsonl-latin1", ("--data", "@c.jsonl"), "c.jsonl is not UTF-8",
                  {"c.jsonl": '{"text": "caf\u00e9 cr\u00e8me"}\n'.encode("latin-1")}),
    _harvest_case("data-jsonl-without-text", ("--data", "@c.jsonl"), "has no 'text' field (it has: body)",
                  {"c.jsonl": b'{"body": "hello"}\n'}),
    _harvest_case("data-parquet-without-text", ("--data", "@c.parquet"), "has no 'text' column (it has: body)",
                  {"c.parquet": _parquet({"body": ["hello"]})}),
    _harvest_case("data-empty-txt", ("--data", "@c.txt"), "c.txt is empty", {"c.txt": b""}),
    _harvest_case("data-empty-jsonl", ("--data", "@c.jsonl"), "c.jsonl is empty", {"c.jsonl": b""}),
    _harvest_case("data-parquet-no-rows", ("--data", "@c.parquet"), "holds no rows", {"c.parquet": _parquet({"text": []})}),
    _harvest_case("data-utf16-txt", ("--data", "@c.txt"), "c.txt is not UTF-8 text",
                  {"c.txt": _PROSE.decode().encode("utf-16")}),
    _harvest_case("data-folder-without-text-files", ("--data", "@corpus"), "only other files",
                  {"corpus/notes.md": b"# notes\n", "corpus/table.csv": b"a,b\n1,2\n"}),
    _harvest_case("data-folder-with-one-bad-file", ("--data", "@corpus"), "b.parquet is not a readable Parquet file",
                  {"corpus/a.txt": _PROSE * 4, "corpus/b.parquet": _PROSE}),
    _harvest_case("data-and-dataset", ("--data", "@c.txt", "--dataset", "someone/something"), "choose one text source",
                  {"c.txt": _PROSE}),
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
           "not a train folder", _user_thing_at("train/site", "share")),
    _tcase("train-overwrite-user-file", ["train", "RUN", "--name", "notes.txt", "--overwrite", *FAST], "existing file",
           _user_thing_at("train/notes.txt", "file")),
    _tcase("train-overwrite-symlink-to-user-folder", ["train", "RUN", "--name", "link", "--overwrite", *FAST],
           "symbolic link", _user_thing_at("train/link", "link")),
    Case("train-exclude-first-beyond-context", lambda w: ["train", w.run, "--name", "ef", "--exclude-first", "500", *FAST],
         "below the run's context length (32"),
    Case("train-exclude-first-negative", lambda w: ["train", w.run, "--name", "ef", "--exclude-first", "-3", *FAST],
         "exclude_first='-3' is not a valid int >= 0"),
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
    Case("share-over-the-run", lambda w: ["share", w.analyzed, "--out", w.analyzed], "not a share folder"),
    Case("share-feature-out-of-range", lambda w: ["share", w.analyzed, "--features", "99999"], "does not exist"),
    Case("share-feature-range-backwards", lambda w: ["share", w.analyzed, "--features", "5-2"], "backwards"),
    Case("share-sae-without-features", lambda w: ["share", w.analyzed, "--features", "resid.0:"], "no features listed"),
    Case("share-features-empty", lambda w: ["share", w.analyzed, "--features", ""], "--features is empty"),
    Case("dashboard-port-out-of-range", lambda w: ["dashboard", w.analyzed, "--port", "70000"], "1-65535"),
    Case("dashboard-port-zero", lambda w: ["dashboard", w.analyzed, "--port", "0"], "1-65535"),
    Case("dashboard-unknown-host", lambda w: ["dashboard", w.analyzed, "--host", "no-such-host.invalid"],
         "not an address of this machine"),
]

# `strata eval --suite`
EVAL_SUITE_CASES = [
    Case("eval-unknown-suite", lambda w: ["eval", w.run, "--name", "t1", "--suite", "core,nope", "--device", "cpu"],
         "unknown eval suite 'nope'; pick from: core"),
    Case("eval-empty-suite", lambda w: ["eval", w.run, "--name", "t1", "--suite", " , ", "--device", "cpu"],
         "--suite is empty"),
]

SEEDS = [  # `strata train --seeds`: one SAE per listed seed
    Case("seeds-empty", lambda w: ["train", w.run, "--name", "s", "--seeds", "", *FAST], "no seed given"),
    Case("seeds-only-commas", lambda w: ["train", w.run, "--name", "s", "--seeds", ",", *FAST], "no seed given"),
    Case("seeds-negative", lambda w: ["train", w.run, "--name", "s", "--seeds", "0,-1", *FAST],
         "'-1' is not a non-negative integer"),
    Case("seeds-duplicate", lambda w: ["train", w.run, "--name", "s", "--seeds", "0,1,1", *FAST], "seed 1 is listed twice"),
    Case("seeds-changed-on-resume", lambda w: ["train", w.run, "--name", "t1", "--seeds", "0,1", "--resume", *FAST],
         "seeds: None -> '0,1'"),
]

# `strata eval --suite absorption,probing,autointerp`: refused before any suite runs, so eval.json is untouched
def _probe_file(case_id: str, lines: list, match: str) -> Case:
    """`strata eval --suite probing --probe-tasks <case folder>/task.jsonl` holding `lines` (dicts or raw text)."""
    def setup(w: Workspace, tmp: Path) -> None:
        (tmp / "task.jsonl").write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))

    return Case(case_id, lambda w: ["eval", w.run, "--name", "t1", "--suite", "core,probing", "--probe-tasks",
                                    _case_dir(w, case_id) / "task.jsonl", "--device", "cpu"], match, setup)


def _texts(label, n: int, field: str = "label") -> list:
    return [{"text": f"example {i} of {label}", field: label} for i in range(n)]


def _run_without_model(w: Workspace, tmp: Path) -> None:
    """A copy of the workspace run whose manifest names no model (as a run of synthetic activations)."""
    shutil.copytree(w.run, tmp / "R", ignore=shutil.ignore_patterns(".locks", ".strata.lock"))
    manifest = json.loads((tmp / "R" / "manifest.json").read_text())
    manifest["model"]["id"] = ""
    (tmp / "R" / "manifest.json").write_text(json.dumps(manifest))


EVAL_CASES: list[Case] = [
    Case("eval-absorption-run-without-model",
         lambda w: ["eval", _case_dir(w, "eval-absorption-run-without-model") / "R", "--name", "t1", "--suite",
                    "core,absorption", "--device", "cpu"], "the absorption suite runs the model",
         setup=_run_without_model),
    _probe_file("probe-tasks-one-class", _texts("spam", 40), "has one class (every example is 'spam')"),
    _probe_file("probe-tasks-missing-label", _texts("a", 25) + [{"text": "no label here"}] + _texts("b", 25),
                "line 26 has no `label`"),
    _probe_file("probe-tasks-missing-text", _texts("a", 25) + [{"body": "x", "label": "b"}] + _texts("b", 25),
                "line 26 has no `text` string"),
    _probe_file("probe-tasks-too-few", _texts("a", 25) + _texts("b", 19), "fewer than 20 examples of a class ('b': 19)"),
    _probe_file("probe-tasks-not-json", _texts("a", 25) + ["text,label"] + _texts("b", 25), "line 26 is not JSON"),
    Case("probe-tasks-no-such-file", lambda w: ["eval", w.run, "--name", "t1", "--suite", "probing", "--probe-tasks",
                                                w.root / "nowhere.jsonl", "--device", "cpu"], "no such file"),
    Case("probe-examples-below-20", lambda w: ["eval", w.run, "--name", "t1", "--suite", "probing",
                                               "--probe-examples", "5", "--device", "cpu"], "probe_examples"),
    Case("autointerp-openai-without-url", lambda w: ["eval", w.run, "--name", "t1", "--suite", "core,autointerp",
                                                     "--explainer", "openai", "--device", "cpu"],
         "needs --explainer-url"),
    Case("autointerp-transformers-without-model", lambda w: ["eval", w.run, "--name", "t1", "--suite", "autointerp",
                                                             "--explainer", "transformers", "--device", "cpu"],
         "needs --explainer-model"),
]


# ---------------------------------------------------------------- share: run choice and interpretable selection
EXPLORER: list[Case] = [
    Case("share-name-without-index", lambda w: ["share", w.analyzed, "--name", "no-such-run"],
         "no index for training run 'no-such-run'; choose one of topk-layer, topk-multilayer"),
    Case("share-name-with-a-path", lambda w: ["share", w.analyzed, "--name", "../topk-layer"], "is not allowed"),
    Case("share-best-zero", lambda w: ["share", w.analyzed, "--features", "best:0"], "write best:N with N > 0"),
    Case("share-best-not-a-number", lambda w: ["share", w.analyzed, "--features", "best:ten"], "best:N"),
    Case("share-sae-in-no-run", lambda w: ["share", w.analyzed, "--features", "resid.9:1"],
         "no SAE 'resid.9' in the indexes of topk-layer, topk-multilayer"),
]


# ---------------------------------------------------------------- analyze --match (causal matches across depth)
def _with_mlp_in_training(w: Workspace, tmp: Path) -> None:
    """Setup: a run copy with training run t2: per-layer SAEs on resid.1-2 and mlp_in.1-2."""
    run = _run_copy(w, tmp)
    assert main(["train", str(run), "--name", "t2", "--sites", "resid,mlp_in", "--layers", "1-2",
                 "--max-tokens", "512", *FAST]) == 0


def _match(case_id: str, pair: str, match: str, name: str = "topk-layer", setup=None) -> Case:
    def argv(w: Workspace) -> list:
        run = _case_dir(w, f"match-{case_id}") / "run" if setup else w.analyzed
        return ["analyze", run, *(["--name", name] if name else []), "--match", pair, "--progress", "false",
                "--device", "cpu"]
    return Case(f"match-{case_id}", argv, match, setup=setup)


CAUSAL_CASES: list[Case] = [
    _match("backwards", "resid.2:resid.1", "put the upstream SAE first: --match resid.1:resid.2"),
    _match("same-sae", "resid.1:resid.1", "pairs an SAE with itself"),
    _match("unknown-sae", "resid.1:resid.9", "no SAE 'resid.9' in this training run"),
    _match("not-a-pair", "resid.1", "is not UP:DOWN"),
    _match("without-name", "resid.0:resid.2", "add --name", name=""),
    _match("one-sae", "resid.0:resid.1", "depth views need two or more", name="topk-multilayer"),
    _match("different-sites", "resid.1:mlp_in.2", "are not one space", name="t2", setup=_with_mlp_in_training),
]


# `strata synth` and `strata eval --suite truth`
SYNTH_CASES = [
    Case("truth-on-a-harvested-run", lambda w: ["eval", w.run, "--name", "t1", "--suite", "truth", "--device", "cpu"],
         "is not a synthetic run"),
    Case("truth-with-core-on-a-harvested-run",
         lambda w: ["eval", w.run, "--name", "t1", "--suite", "core,truth", "--device", "cpu"], "strata synth"),
    Case("synth-into-user-folder", lambda w: ["synth", w.user, "--tokens", "256"], "holds no Strata run"),
    Case("synth-onto-a-run", lambda w: ["synth", w.run, "--tokens", "256"], "--overwrite"),
    Case("synth-overwrite-trained-run", lambda w: ["synth", w.run, "--tokens", "256", "--overwrite"],
         "would replace the activations"),
    Case("synth-unknown-site", lambda w: ["synth", w.root / "cases/synth-unknown-site/R", "--sites", "resid,attn_out"],
         "synth writes resid and optionally mlp_in, mlp_out"),
    Case("synth-fewer-tokens-than-a-context", lambda w: ["synth", w.root / "cases/synth-few/R", "--tokens", "10"],
         "less than one context"),
    Case("synth-zero-layers", lambda w: ["synth", w.root / "cases/synth-zero-layers/R", "--layers", "0"], "layers"),
]

# `strata train --mode clt` (cross-layer transcoders)
def _harvest_only(sites: str):
    """A private tiny harvest of layers 0-1 with only `sites`."""
    def setup(w: Workspace, tmp: Path) -> None:
        import contextlib
        import io

        from conftest import harvest_tiny

        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            harvest_tiny(tmp / "run", w.model, sites=sites, layers="0-1", max_tokens=2048)
    return setup


def _trained_clt(w: Workspace, tmp: Path) -> None:
    shutil.copytree(w.run, tmp / "run", ignore=shutil.ignore_patterns("train", ".locks", ".strata.lock"))
    assert main(["train", str(tmp / "run"), "--mode", "clt", "--name", "c", "--max-tokens", "512", *FAST]) == 0


CLT_CASES = [
    Case("clt-run-without-mlp-in", lambda w: ["train", w.root / "cases/clt-run-without-mlp-in/run", "--mode", "clt", *FAST],
         "--sites mlp_in,mlp_out", setup=_harvest_only("resid")),
    Case("clt-run-without-mlp-out", lambda w: ["train", w.root / "cases/clt-run-without-mlp-out/run", "--mode", "clt",
                                               *FAST], "needs mlp_out.0 for mlp_in.0; re-harvest with `strata harvest",
         setup=_harvest_only("mlp_in")),
    Case("clt-layer-not-harvested", lambda w: ["train", w.root / "cases/clt-layer-not-harvested/run", "--mode", "clt",
                                               "--layers", "1-2", *FAST],
         "--sites mlp_in,mlp_out --layers 1-2` (plus the sites you already have)",
         setup=_harvest_only("mlp_in,mlp_out")),
    Case("clt-relu", lambda w: ["train", w.run, "--mode", "clt", "--arch", "relu", *FAST], "clt mode supports --arch"),
    Case("clt-too-big", lambda w: ["train", w.run, "--mode", "clt", "--n-latents", "1000000000", *FAST],
         "lower --expansion or --n-latents, or train fewer --layers"),
    Case("clt-export", lambda w: ["export", w.root / "cases/clt-export/run", "--name", "c", "--out", w.root / "clt-out"],
         "no folder format for our clt", setup=_trained_clt),
]

# `strata train --mode clt --arch jumprelu --sparsity tanh` (the paper's penalty)
CLT_TANH = [
    Case("tanh-sparsity-on-transcoders", lambda w: ["train", w.run, "--mode", "transcoder", "--arch", "jumprelu",
                                                    "--sparsity", "tanh", *FAST], "use --mode clt --arch jumprelu"),
    Case("tanh-sparsity-on-topk-clt", lambda w: ["train", w.run, "--mode", "clt", "--sparsity", "tanh", *FAST],
         "not for --mode clt --arch topk"),
    Case("tanh-c-zero", lambda w: ["train", w.run, "--mode", "clt", "--arch", "jumprelu", "--sparsity", "tanh",
                                   "--tanh-c", "0", *FAST], "tanh_c='0' is not a valid float > 0"),
    Case("pre-act-coef-negative", lambda w: ["train", w.run, "--mode", "clt", "--arch", "jumprelu", "--sparsity",
                                             "tanh", "--pre-act-coef", "-1e-6", *FAST],
         "pre_act_coef='-1e-6' is not a valid float >= 0"),
    Case("tanh-warmup-negative", lambda w: ["train", w.run, "--mode", "clt", "--arch", "jumprelu", "--sparsity",
                                            "tanh", "--tanh-warmup-steps", "-5", *FAST],
         "tanh_warmup_steps='-5' is not a valid int >= 0"),
]

# ---------------------------------------------------------------- `strata graph` (sae/circuits)
def _trained_copy(w: Workspace, folder: str, name: str, train: list) -> Path:
    """ws.root/<folder>: a copy of the harvest with `strata train ... --name <name>` run on it (made once, before a
    snapshot)."""
    run = w.root / folder
    if not (run / "train" / name).is_dir():
        shutil.copytree(w.run, run, ignore=shutil.ignore_patterns("train", ".locks", ".strata.lock", "README-mine.txt"))
        assert main(["train", str(run), *train, "--name", name, *FAST]) == 0
    return run


def _graph_run(w: Workspace) -> Path:
    """ws.root/graph-run: transcoders on MLPs 0 and 2."""
    return _trained_copy(w, "graph-run", "tc", ["--mode", "transcoder", "--layers", "0,2", "--max-tokens", "1024"])


def _gcase(case_id: str, tail: list, match: str, setup=None) -> Case:
    def prepare(w: Workspace, tmp: Path) -> None:
        _graph_run(w)
        if setup is not None:
            setup(w, tmp)
    return Case(case_id, lambda w: ["graph", w.root / "graph-run", "--name", "tc", *tail], match, prepare)


def _resid_only_harvest(w: Workspace, tmp: Path) -> None:
    assert main(["harvest", str(tmp / "R"), "--model", str(w.model), *HARVEST]) == 0


def _graph_made(w: Workspace, tmp: Path) -> None:
    assert main(["graph", str(w.root / "graph-run"), "--name", "tc", "--prompt", "The cat", "--graph-name", "kept"]) == 0


def _users_graph_file(w: Workspace, tmp: Path) -> None:
    folder = w.root / "graph-run" / "graphs" / "tc"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mine.json").write_text('{"my": "circuit notes"}\n')


GRAPH_CASES = [
    _gcase("graph-prompt-too-long", ["--prompt", "word " * 40], "trained on 32-token contexts"),
    _gcase("graph-pin-no-such-feature", ["--prompt", "The cat", "--pin", "0:9999"], "feature 9999 does not exist"),
    _gcase("graph-pin-uncovered-layer", ["--prompt", "The cat", "--pin", "1:3"], "layer 1 has no transcoder"),
    _gcase("graph-pin-bad-syntax", ["--prompt", "The cat", "--pin", "three"], "LAYER:FEATURE"),
    _gcase("graph-no-prompt", [], "--prompt"),
    _gcase("graph-name-escapes", ["--prompt", "The cat", "--graph-name", "../x"], "is not allowed"),
    _gcase("graph-exists", ["--prompt", "The cat", "--graph-name", "kept"], "--overwrite", setup=_graph_made),
    _gcase("graph-overwrite-user-file", ["--prompt", "The cat", "--graph-name", "mine", "--overwrite", "true"],
           "replaces only graphs it wrote", setup=_users_graph_file),
    Case("graph-not-transcoders", lambda w: ["graph", w.run, "--name", "t1", "--prompt", "The cat"],
         "modes that support graphs: transcoder"),
    Case("graph-no-mlp-keys", lambda w: ["graph", w.root / "cases" / "graph-no-mlp-keys" / "R", "--name", "t1",
                                         "--prompt", "The cat"], "--sites mlp_in,mlp_out,resid", setup=_resid_only_harvest),
]

GRAPHPERF_CASES = [  # tc trained with the default --exclude-first 1: position 0 has no feature nodes
    _gcase("graph-pin-untrained-position", ["--prompt", "The cat", "--pin", "0:3@0"],
           "trained without (--exclude-first), so it has no feature nodes"),
]


# `strata graph` on a cross-layer transcoder (sae/circuits/adapter.py CLTAdapter)
def _clt_graph_run(w: Workspace) -> Path:
    """ws.root/clt-graph-run: a CLT "c" over MLPs 0 and 2."""
    return _trained_copy(w, "clt-graph-run", "c", ["--mode", "clt", "--layers", "0,2", "--max-tokens", "512"])


def _cltcase(case_id: str, tail: list, match: str) -> Case:
    return Case(case_id, lambda w: ["graph", w.root / "clt-graph-run", "--name", "c", *tail], match,
                lambda w, tmp: _clt_graph_run(w))


CLTGRAPH_CASES = [  # the CLT's feature numbers: layer 2's block of 128 latents is 128-255
    _cltcase("clt-graph-pin-outside-the-layer-block", ["--prompt", "The cat", "--pin", "2:5"],
             "feature 5 does not exist in clt at layer 2 (128-255)"),
    _cltcase("clt-graph-pin-uncovered-layer", ["--prompt", "The cat", "--pin", "1:130"],
             "layer 1 is not one of the CLT's layers"),
    _cltcase("clt-graph-prompt-too-long", ["--prompt", "word " * 40], "the CLT of c was trained on 32-token contexts"),
]


# `strata intervene` (sae/circuits/intervene.py): refused before the model loads
def _intervene(w, edit, *more):
    return ["intervene", w.analyzed, "--name", "topk-layer", "--prompt", "a b c", "--edit", edit, "--device", "cpu", *more]


INTERVENE_CASES = [
    Case("intervene-feature-does-not-exist", lambda w: _intervene(w, "resid.1:99999*0"),
         "feature 99999 does not exist: SAE resid.1 has features 0-"),
    Case("intervene-negative-feature", lambda w: _intervene(w, "resid.1:-3"), "feature -3 does not exist"),
    Case("intervene-alpha-inf", lambda w: _intervene(w, "resid.1:2*inf"), "not a finite number"),
    Case("intervene-alpha-nan", lambda w: _intervene(w, "resid.1:2@0*nan"), "not a finite number"),
    Case("intervene-steer-alpha-nan", lambda w: _intervene(w, "", "--steer", "resid.2:1*nan"), "not a finite number"),
    Case("intervene-alpha-not-a-number", lambda w: _intervene(w, "resid.1:2*lots"), "is not a number"),
    Case("intervene-unknown-sae", lambda w: _intervene(w, "resid.9:2"), "use one of resid.0"),
    Case("intervene-garbled-edit", lambda w: _intervene(w, "resid.1 feature 2"), "cannot read the edit"),
    Case("intervene-multilayer-without-key", lambda w: ["intervene", w.analyzed, "--name", "topk-multilayer", "--prompt",
                                                        "a b", "--edit", "multilayer:1"], "say which layer"),
    Case("intervene-nothing-to-do", lambda w: _intervene(w, " ; "), "nothing to do"),
    Case("intervene-unknown-train", lambda w: ["intervene", w.analyzed, "--name", "nope", "--prompt", "a", "--edit",
                                               "resid.1:2"], "no trained SAEs"),
]


# `strata intervene` on SAEs that write several keys: a CLT's layer is in its feature number, a crosscoder edits
# every key it writes, so neither takes /KEY
def _trained_multikey(w: Workspace, tmp: Path) -> None:
    shutil.copytree(w.run, tmp / "run", ignore=shutil.ignore_patterns("train", ".locks", ".strata.lock"))
    assert main(["train", str(tmp / "run"), "--mode", "clt", "--name", "c", "--max-tokens", "512", *FAST]) == 0
    assert main(["train", str(tmp / "run"), "--mode", "crosscoder", "--sites", "resid", "--layers", "1,2", "--name", "x",
                 "--max-tokens", "512", *FAST]) == 0


def _intervene2(case_id: str, train: str, edit: str, match: str) -> Case:
    return Case(case_id, lambda w: ["intervene", w.root / "cases" / case_id / "run", "--name", train, "--prompt", "a b",
                                    "--edit", edit, "--device", "cpu"], match, setup=_trained_multikey)


INTERVENE2_CASES = [
    _intervene2("intervene-clt-with-key", "c", "clt/mlp_in.1:3*0", "its layer is in the feature number"),
    _intervene2("intervene-crosscoder-with-key", "x", "crosscoder/resid.2:3*0", "drop /resid.2 from the edit"),
    _intervene2("intervene-clt-feature-out-of-range", "c", "clt:100000", "SAE clt has features 0-"),
]


ALL_CASES = (CONFIG_CASES + DATA_LOSS_CASES + HARVEST_CASES + INPUT_CASES + TRAIN_CASES + INTEROP_CASES
             + DASHBOARD_CASES + EVAL_SUITE_CASES + SEEDS + EVAL_CASES + EXPLORER + SYNTH_CASES + CAUSAL_CASES
             + CLT_CASES + GRAPH_CASES + INTERVENE_CASES + INTERVENE2_CASES + CLT_TANH + CLTGRAPH_CASES
             + GRAPHPERF_CASES)


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
