"""Labelled text tasks for sparse probing: three built from the built-in corpus (offline, deterministic), or a
user's `.jsonl` file.

  code_vs_prose    blocks of CPython's reference topics (pydoc_data): indented blocks holding code punctuation
                   (code examples, grammar) vs unindented paragraphs of >= 20 words
  stdlib_package   docstrings (module, class, function; >= 100 characters) of four standard-library packages:
                   asyncio, email, unittest, xml
  docs_vs_docstring  reference-topic paragraphs vs standard-library docstrings (two registers of prose)
Each class is a seeded sample of `per_class` examples from the sorted candidates.

A user's task: one JSON object per line with a string `text` and a `label` (string or number); at least two
classes and at least 20 examples of each.
"""
from __future__ import annotations

import ast
import json
import re
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np

from activations.errors import StrataError

MIN_PER_CLASS = 20
PACKAGES = ("asyncio", "email", "unittest", "xml")
_CODE_CHARS = re.compile(r"[=()\[\]{}]|>>>")


def _topic_blocks() -> tuple[list[str], list[str]]:
    """(code blocks, prose paragraphs) of the reference topics, in sorted topic order."""
    from pydoc_data.topics import topics

    code, prose = [], []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = [ln for ln in block.split("\n") if ln.strip()]
            if len(lines) >= 2 and all(ln.startswith("   ") for ln in lines) and _CODE_CHARS.search(block):
                code.append("\n".join(lines))
            elif lines and not lines[0].startswith(" ") and len(block.split()) >= 20:
                prose.append(" ".join(ln.strip() for ln in lines))
    return code, prose


def _docstrings(package: str) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    out = []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.relative_to(root).parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 100:
                    out.append(doc)
    return out


def _sample(items: list[str], n: int, rng: np.random.Generator) -> list[str]:
    return [items[i] for i in sorted(rng.permutation(len(items))[:n])]


def builtin_tasks(per_class: int) -> dict[str, tuple[list[str], list[str]]]:
    """{task: (texts, labels)}, `per_class` examples per class (fewer where the corpus has fewer)."""
    rng = np.random.default_rng(0)
    code, prose = _topic_blocks()
    docs = {p: _docstrings(p) for p in PACKAGES}
    tasks = {}

    def task(name, classes: dict):
        texts, labels = [], []
        for label, items in classes.items():
            chosen = _sample(items, per_class, rng)
            texts += chosen
            labels += [label] * len(chosen)
        tasks[name] = (texts, labels)

    task("code_vs_prose", {"code": code, "prose": prose})
    task("stdlib_package", docs)
    every_doc = [d for p in PACKAGES for d in docs[p]]
    task("docs_vs_docstring", {"docs": prose, "docstring": every_doc})
    return tasks


def read_task_file(path: str) -> dict[str, tuple[list[str], list[str]]]:
    """{file stem: (texts, labels)} of a user's .jsonl task; StrataError naming the first problem and the fix."""
    p = Path(path)
    if not p.is_file():
        raise StrataError(f"--probe-tasks {path}: no such file; give a .jsonl file with one "
                          f'{{"text": ..., "label": ...}} object per line')
    texts, labels = [], []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StrataError(f"--probe-tasks {path}: cannot read it as UTF-8 text ({e}); give a .jsonl file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise StrataError(f"--probe-tasks {path} line {n} is not JSON; write one "
                              f'{{"text": ..., "label": ...}} object per line') from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not rec["text"].strip():
            raise StrataError(f"--probe-tasks {path} line {n} has no `text` string; every line needs "
                              f"a non-empty `text` and a `label`")
        if not isinstance(rec.get("label"), (str, int)) or isinstance(rec.get("label"), bool):
            raise StrataError(f"--probe-tasks {path} line {n} has no `label` (a string or a whole number); "
                              f"every line needs a `text` and a `label`")
        texts.append(rec["text"])
        labels.append(str(rec["label"]))
    counts = Counter(labels)
    if len(counts) < 2:
        only = f" (every example is {next(iter(counts))!r})" if counts else " (it holds no examples)"
        raise StrataError(f"--probe-tasks {path} has one class{only}; a probe needs at least two labels")
    few = {k: v for k, v in sorted(counts.items()) if v < MIN_PER_CLASS}
    if few:
        listed = ", ".join(f"{k!r}: {v}" for k, v in few.items())
        raise StrataError(f"--probe-tasks {path} has fewer than {MIN_PER_CLASS} examples of a class ({listed}); "
                          f"add examples or drop that label")
    return {p.stem: (texts, labels)}
