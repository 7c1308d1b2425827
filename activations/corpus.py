"""Text sources: the built-in offline corpus, local files, or a streamed Hugging Face dataset.

Each source yields documents (strings) in a fixed order, and can start at document `start` so a resumed
harvest skips what it already stored without re-reading it through the model.

The built-in corpus is real English prose that every Python installation carries: the reference
documentation topics of `pydoc_data` followed by the docstrings of the standard library's modules (read
with `ast` from the source files, never imported), in sorted order — 502 documents, about 554k SmolLM2 tokens.
"""
from __future__ import annotations

import ast
import itertools
import json
import sysconfig
from pathlib import Path
from typing import Iterator

from activations.errors import StrataError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


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


def _local_files(root: Path) -> list[Path]:
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    else:
        raise StrataError(f"data path {root} does not exist; pass a .txt/.jsonl/.parquet file or a folder of them")
    bad = [p for p in files if p.suffix not in LOCAL_SUFFIXES]
    if bad:
        raise StrataError(f"{bad[0]} is not a supported text file; use .txt, .jsonl or .parquet")
    if not files:
        raise StrataError(f"no .txt/.jsonl/.parquet files under {root}; add some or point --data elsewhere")
    return files


def local_documents(root: Path, text_column: str) -> Iterator[str]:
    for path in _local_files(root):
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise StrataError(f"{path}:{n} is not valid JSON; fix the line or remove it") from None
                    if text_column not in row:
                        raise StrataError(f"{path}:{n} has no {text_column!r} field (fields: {', '.join(row)}); pass --text-column")
                    yield str(row[text_column])
        else:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if text_column not in pf.schema_arrow.names:
                raise StrataError(f"{path} has no column {text_column!r} (columns: {', '.join(pf.schema_arrow.names)}); pass --text-column")
            for batch in pf.iter_batches(columns=[text_column]):
                yield from (str(t) for t in batch.column(0).to_pylist() if t is not None)


def hub_documents(name: str, config: str | None, split: str, text_column: str, start: int) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types for "not found" / "offline"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise StrataError(f"cannot open dataset {name!r} ({first}); offline, leave --dataset out for the built-in "
                          f"corpus or pass --data with a local file or folder") from None
    cols = getattr(ds, "column_names", None) or []
    if cols and text_column not in cols:
        raise StrataError(f"dataset {name!r} has no column {text_column!r} (columns: {', '.join(cols)}); pass --text-column")
    if start:
        ds = ds.skip(start)
    for row in ds:
        if text_column not in row:
            raise StrataError(f"dataset {name!r} has no column {text_column!r} (columns: {', '.join(row)}); pass --text-column")
        yield str(row[text_column])


def documents(cfg, start: int = 0) -> Iterator[str]:
    """Documents of the configured source, from document index `start` on."""
    if cfg.dataset and cfg.data:
        raise StrataError("both --dataset and --data given; choose one text source")
    if cfg.dataset:
        return hub_documents(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column, start)
    if cfg.data:
        return itertools.islice(local_documents(Path(cfg.data), cfg.text_column), start, None)
    return itertools.islice(builtin_documents(), start, None)


def describe(cfg) -> dict:
    if cfg.dataset:
        return {"kind": "hub", "name": cfg.dataset, "config": cfg.dataset_config, "split": cfg.split, "text_column": cfg.text_column}
    if cfg.data:
        return {"kind": "local", "path": str(Path(cfg.data).resolve()), "text_column": cfg.text_column}
    return {"kind": "builtin", "name": "python-docs", "description": "pydoc_data topics + standard-library docstrings"}
