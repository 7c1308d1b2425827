"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything is written under a temporary name in the same folder, flushed, and moved into place with
os.replace (atomic on POSIX), so a crash or kill -9 never leaves a half-written file under a real name.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from activations.layout import OWNER_MARKER

TMP_SUFFIX = ".partial"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def staged_dir(final_dir, kind: str):
    """Yield a fresh folder `<final>.partial`, marked as Strata's `kind` from the start (so a leftover of a kill
    is recognised and replaced next time); when the block ends it is swapped in with replace_dir, and on any
    error it is removed. A `.partial` that is not Strata's is refused, never cleared."""
    from activations.ownership import check_replaceable, mark

    final_dir = Path(final_dir)
    tmp = final_dir.with_name(final_dir.name + TMP_SUFFIX)
    check_replaceable(tmp, kind)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        mark(tmp, kind)
        yield tmp
        replace_dir(tmp, final_dir, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp_dir, final_dir, kind: str) -> None:
    """Swap a fully written folder into place as Strata's `kind` output. `final_dir` may only be missing,
    empty, or an earlier folder of the same kind (activations/ownership.py); anything else is refused before
    a byte changes. The old folder is renamed aside first and removed last, so at every instant either the old
    or the new complete folder exists (readers check `<final>.old` too)."""
    from activations.ownership import check_replaceable, mark, remove_owned

    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    check_replaceable(final_dir, kind)
    check_replaceable(old, kind)
    mark(tmp_dir, kind)
    if old.exists():
        remove_owned(old)
    if final_dir.exists():
        if not (final_dir / OWNER_MARKER).exists() and any(final_dir.iterdir()):
            mark(final_dir, kind)  # a folder of this kind written before markers existed: keep it recognisable
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if old.exists():
        remove_owned(old)


def finish_replace(final_dir, kind: str) -> None:
    """Complete a replace_dir that a kill stopped after the swap: with `final_dir` in place, what is left of
    `<final>.old` (removed marker last, so still recognisably Strata's `kind`) is removed; anything else there is
    refused. Without `final_dir`, `<final>.old` is the complete folder readers use (existing_dir) and stays."""
    from activations.ownership import check_replaceable, remove_owned

    final_dir = Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if final_dir.is_dir() and (old.exists() or old.is_symlink()):
        check_replaceable(old, kind)
        remove_owned(old)


def existing_dir(final_dir) -> Path | None:
    """The complete folder written by replace_dir: `final_dir`, or `<final>.old` if a swap was interrupted."""
    final_dir = Path(final_dir)
    if final_dir.is_dir():
        return final_dir
    old = final_dir.with_name(final_dir.name + ".old")
    return old if old.is_dir() else None
