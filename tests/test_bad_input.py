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
              "ce_context: 4\n", "unknown EvalConfig field(s) ce_context; valid fields: batch_size, ce_contexts"),
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
HARVEST_CASES: list[Case] = [
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


ALL_CASES = CONFIG_CASES + DATA_LOSS_CASES + HARVEST_CASES + INPUT_CASES + TRAIN_CASES + INTEROP_CASES + DASHBOARD_CASES


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
