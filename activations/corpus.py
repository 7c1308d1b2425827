"""Text sources: the built-in offline corpus, local files, or a streamed Hugging Face dataset.

Each source yields documents (strings) in a fixed order, and can start at document `start` so a resumed
harvest skips what it already stored without re-reading it through the model.

The built-in corpus is real English prose that every Python installation carries: the reference
documentation topics of `pydoc_data` followed by the docstrings of the standard library's modules (read
with `ast` from the source files, never imported), in sorted order — 502 documents, about 554k SmolLM2 tokens.

Local files (`--data FILE_OR_FOLDER`, a folder's files in sorted path order): a `.txt` file is one document;
every record of a `.jsonl` file and every row of a `.parquet` file is one (its `--text-column`), streamed by
the `datasets` json and parquet loaders. A file that is empty, not what its suffix says, or lacks the text
column stops the harvest with one line naming it; bytes of a `.txt` file that are not UTF-8 become U+FFFD
with a warning that counts them. Every file is checked (its start, or its first record) before the first
document is given; `check_source` runs the same checks for a caller that wants them before it writes anything.
"""
from __future__ import annotations

import ast
import itertools
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from activations.errors import StrataError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
_LOADERS = {".jsonl": "json", ".parquet": "parquet"}  # datasets' packaged loaders
_SNIFF_BYTES = 1 << 16  # how much of a .txt file check_source reads to tell text from binary
_MAX_BAD_FRACTION = 0.1  # more undecodable bytes than this and a .txt file is not text at all
_ESCAPED = re.compile("[\udc80-\udcff]")  # one per byte that is not UTF-8 (decoded with surrogateescape)


def builtin_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip.intersection(path.relative_to(stdlib).parts):
            continue
        doc = _module_docstrings(path)
        if len(doc) >= 200:
            yield doc


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                parts.append(doc)
    return "\n\n".join(parts)


def _warn(message: str) -> None:
    print(f"strata: warning: {message}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _quiet_datasets():
    """datasets logs its own copy of every read error and draws progress bars: ours are one line each."""
    import datasets

    datasets.utils.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    return datasets


# ---------------------------------------------------------------- local files
def local_files(root: Path) -> list[Path]:
    """The files a `--data` path stands for, in the fixed order documents are numbered."""
    if root.is_file():
        if root.suffix not in LOCAL_SUFFIXES:
            raise StrataError(f"{root} is not a supported text file; use .txt, .jsonl or .parquet")
        return [root]
    if not root.is_dir():
        raise StrataError(f"data path {root} does not exist; pass a .txt/.jsonl/.parquet file or a folder of them")
    everything = sorted(p for p in root.rglob("*") if p.is_file())
    files = [p for p in everything if p.suffix in LOCAL_SUFFIXES]
    if not files:
        found = f" (only other files, e.g. {everything[0].name})" if everything else " (it is empty)"
        raise StrataError(f"no .txt/.jsonl/.parquet files under {root}{found}; add some or point --data elsewhere")
    return files


def _text_document(path: Path) -> str:
    """A .txt file as one document; bytes that are not UTF-8 become U+FFFD, with a warning counting them."""
    data = _read_bytes(path)
    text, bad = _decode_text(path, data)
    if bad:
        _warn(f"{path}: {bad} of {len(data)} bytes are not valid UTF-8 and were replaced by U+FFFD; "
              f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) to keep them")
    return text


def _read_bytes(path: Path, limit: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as e:
        raise StrataError(f"cannot read {path} ({e.strerror or _first_line(e)}); fix its permissions or remove it") from None


def _decode_text(path: Path, data: bytes, truncated: bool = False) -> tuple[str, int]:
    """(text, number of bytes that were not UTF-8); refuses an empty file and one that is not text at all.
    `truncated`: `data` is the start of a longer file, so its last character may be cut (up to 3 bytes)."""
    if not data:
        raise StrataError(f"{path} is empty; add text to it or remove it from the corpus")
    text, bad = _ESCAPED.subn("\ufffd", data.decode("utf-8", errors="surrogateescape"))
    if b"\x00" in data or bad > _MAX_BAD_FRACTION * len(data) + (3 if truncated else 0):
        raise StrataError(f"{path} is not UTF-8 text (binary, or another encoding such as UTF-16); "
                          f"convert it to UTF-8 text or remove it from the corpus")
    return text, bad


def _open_table(path: Path, text_column: str):
    """A streamed `datasets` view of one .jsonl/.parquet file with its text column checked."""
    kind = "JSON Lines" if path.suffix == ".jsonl" else "Parquet"
    if path.stat().st_size == 0:
        raise StrataError(f"{path} is empty; add records to it or remove it from the corpus")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:  # the footer: proves it is Parquet; datasets cannot stream a file of zero rows
            rows = pq.read_metadata(path).num_rows
        except Exception as e:  # noqa: BLE001 -- pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
            raise StrataError(f"{path} is not a readable {kind} file ({_first_line(e)}); "
                              f"write it again or remove it from the corpus") from None
        if rows == 0:
            raise StrataError(f"{path} holds no rows; add rows to it or remove it from the corpus")
    datasets = _quiet_datasets()
    try:
        ds = datasets.load_dataset(_LOADERS[path.suffix], data_files=str(path), split="train", streaming=True)
    except Exception as e:  # noqa: BLE001 -- datasets and pyarrow raise many types for a file they cannot parse
        raise _unreadable(path, kind, e) from None
    columns = list(ds.features) if ds.features else None
    if columns is not None and text_column not in columns:
        raise StrataError(f"{path} has no {text_column!r} {'column' if kind == 'Parquet' else 'field'} "
                          f"(it has: {', '.join(columns) or 'nothing'}); pass --text-column")
    return ds.select_columns([text_column]) if kind == "Parquet" else ds


def _unreadable(path: Path, kind: str, e: BaseException) -> StrataError:
    if isinstance(e, UnicodeDecodeError):
        return StrataError(f"{path} is not UTF-8 text; convert it to UTF-8 or remove it from the corpus")
    fix = "each line must be one JSON object" if kind == "JSON Lines" else "write it again"
    return StrataError(f"{path} is not a readable {kind} file ({_first_line(e)}); {fix}, or remove it from the corpus")


def _table_documents(path: Path, text_column: str) -> Iterator[str]:
    """Every record's text, in file order. A .jsonl record without the field stops with its number; a null
    Parquet cell is skipped (as a missing value in a table)."""
    kind = "JSON Lines" if path.suffix == ".jsonl" else "Parquet"
    rows = iter(_open_table(path, text_column))
    n = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 -- as above, for a bad record further into the file
            raise _unreadable(path, kind, e) from None
        n += 1
        text = row.get(text_column)
        if text is None:
            if kind == "Parquet":
                continue
            raise StrataError(f"{path}: record {n} has no {text_column!r} field (it has: "
                              f"{', '.join(k for k, v in row.items() if v is not None) or 'nothing'}); "
                              f"pass --text-column or fix the record")
        yield str(text)
    if n == 0:
        raise StrataError(f"{path} holds no records; add some or remove it from the corpus")


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield _text_document(path)
    else:
        yield from _table_documents(path, text_column)


def _check_local_file(path: Path, text_column: str) -> None:
    """Cheap checks of one file (its start, or its first record): what a harvest would fail on."""
    if path.suffix == ".txt":
        _decode_text(path, _read_bytes(path, _SNIFF_BYTES), truncated=path.stat().st_size > _SNIFF_BYTES)
        return
    for _ in itertools.islice(_table_documents(path, text_column), 1):
        pass


def local_documents(root: Path, text_column: str) -> Iterator[str]:
    """Every document of the files under `root`. All files are checked before the first document is given,
    so a bad file anywhere stops a harvest before it has stored anything."""
    files = local_files(root)
    for path in files:
        _check_local_file(path, text_column)
    for path in files:
        yield from _file_documents(path, text_column)


# ---------------------------------------------------------------- Hugging Face hub datasets (streamed)
def _open_hub(name: str, config: str | None, split: str, text_column: str):
    datasets = _quiet_datasets()
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 -- datasets raises many types for "not found" / "offline"
        raise StrataError(f"cannot open dataset {name!r} ({_first_line(e)}); offline, leave --dataset out for the "
                          f"built-in corpus or pass --data with a local file or folder") from None
    cols = getattr(ds, "column_names", None) or []
    if cols and text_column not in cols:
        raise StrataError(f"dataset {name!r} has no column {text_column!r} (columns: {', '.join(cols)}); pass --text-column")
    return ds


def hub_documents(name: str, config: str | None, split: str, text_column: str, start: int) -> Iterator[str]:
    ds = _open_hub(name, config, split, text_column)
    if start:
        ds = ds.skip(start)
    for row in ds:
        if text_column not in row:
            raise StrataError(f"dataset {name!r} has no column {text_column!r} (columns: {', '.join(row)}); pass --text-column")
        yield str(row[text_column])


# ---------------------------------------------------------------- the configured source
def check_source(cfg) -> None:
    """Raise the StrataError a harvest of `cfg` would meet on its text source (a missing or unreadable file,
    the wrong format, no text column), before anything is written: call it before touching the run dir."""
    if cfg.dataset and cfg.data:
        raise StrataError("both --dataset and --data given; choose one text source")
    if cfg.dataset:
        _open_hub(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column)
    elif cfg.data:
        for path in local_files(Path(cfg.data)):
            _check_local_file(path, cfg.text_column)


def documents(cfg, start: int = 0) -> Iterator[str]:
    """Documents of the configured source, from document index `start` on (read lazily, in a fixed order)."""
    if cfg.dataset and cfg.data:
        raise StrataError("both --dataset and --data given; choose one text source")
    if cfg.dataset:
        yield from hub_documents(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column, start)
    elif cfg.data:
        yield from itertools.islice(local_documents(Path(cfg.data), cfg.text_column), start, None)
    else:
        yield from itertools.islice(builtin_documents(), start, None)


def describe(cfg) -> dict:
    if cfg.dataset:
        return {"kind": "hub", "name": cfg.dataset, "config": cfg.dataset_config, "split": cfg.split, "text_column": cfg.text_column}
    if cfg.data:
        return {"kind": "local", "path": str(Path(cfg.data).resolve()), "text_column": cfg.text_column}
    return {"kind": "builtin", "name": "python-docs", "description": "pydoc_data topics + standard-library docstrings"}
