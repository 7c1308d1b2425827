"""One writer at a time per run: `strata harvest` holds the whole run exclusively; every other writer (train
and analyze of one name, share, sweeps) holds the run shared, so no harvest can replace the activations under
it, plus its own scope exclusively, so two trainings of the same name cannot interleave.

The locks are `flock`s on small files beside the data (RUN/.strata.lock, RUN/.locks/<scope>.lock). The kernel
drops them when the process ends, however it ends, so a kill -9 never leaves a stale lock; the holder's pid and
command are written into the file only to name it in the refusal.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from activations import layout
from activations.errors import StrataError


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"`{info['command']}` (pid {info['pid']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another Strata process"


def _open_locked(path: Path, exclusive: bool, command: str, what: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StrataError(f"cannot create the lock file {path} ({e.strerror}); check that the folder is writable") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StrataError(f"{what} is in use by {_holder(path)}; wait for it to finish (or stop it), then rerun") from None
    if exclusive or os.fstat(fd).st_size == 0:
        info = {"command": command, "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


@contextlib.contextmanager
def run_lock(run, command: str, scope: str | None = None):
    """Hold RUN for `command` (e.g. "strata train --name x"): exclusively when scope is None (a harvest), else
    shared, together with the scope (e.g. "train-x") exclusively. Refuses at once (StrataError) when taken."""
    run = Path(run)
    fds = [_open_locked(layout.lock_path(run), scope is None, command, str(run))]
    try:
        if scope is not None:
            fds.append(_open_locked(layout.scope_lock_path(run, scope), True, command, f"{run} ({scope})"))
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)  # closing the descriptor releases the flock
