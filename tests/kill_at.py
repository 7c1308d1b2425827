"""Run `strata ARGS...` in a child process that SIGKILLs itself at one exact point of its work, as a power cut or
the OOM killer would (tests/test_crash_safety_harvest.py, tests/test_crash_safety_train.py). The product code has
no kill hooks: before Strata is imported, the child wraps one call that every write of that kind goes through, so
that its n-th matching call kills the process before or after the real call, or halfway through the write.

    usage: python tests/kill_at.py KILLPOINT_JSON ARGS...      (from a test: run_until_killed(point, argv))

Targets (`KillPoint.target`); `match` is a path ending (or several) a call must touch to count, "" counts every
call:
  replace    os.replace; matched on the destination, or on the source when the ending is ".partial" (a staged
             folder being swapped in)
  json       activations.atomic.atomic_write_json; torn: half the text in the temporary file it would rename
  save_file  safetensors.torch.save_file; torn: the file written, then cut to half
  rmtree     shutil.rmtree; killed after removing the folder's first entry
  log        sae.logger.MetricsLogger.log; torn: half a metrics line written
  module:Class.method   any other method, killed just before its n-th call
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class KillPoint:
    id: str
    target: str                    # see the module docstring
    nth: int                       # the n-th matching call kills
    when: str = "before"           # before | after | torn (the file is half written when the process dies)
    match: str | list[str] = ""    # path ending(s) a call must touch to count; "" counts every call


def run_until_killed(point: KillPoint, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """`strata argv` in a child process armed with `point` (returncode -SIGKILL when the point was reached)."""
    return subprocess.run([sys.executable, __file__, json.dumps(asdict(point)), *map(str, argv)],
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env), capture_output=True, text=True,
                          timeout=300, check=False)


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: KillPoint) -> None:
    """Wrap the point's target so that its n-th matching call kills this process (before Strata imports it)."""
    endings = tuple([point.match] if isinstance(point.match, str) else point.match)
    calls = [0]

    def hit(*paths) -> bool:
        if endings != ("",) and not any(str(p).endswith(endings) for p in paths):
            return False
        calls[0] += 1
        return calls[0] == point.nth

    if point.target == "replace":
        real_replace = os.replace
        on_source = endings[0].endswith(".partial")

        def replace(src, dst, *args, **kw):
            now = hit(src if on_source else dst)
            if now and point.when == "before":
                die()
            real_replace(src, dst, *args, **kw)
            if now:
                die()
        os.replace = replace
    elif point.target == "json":
        import activations.atomic as atomic

        real_json = atomic.atomic_write_json

        def atomic_write_json(path, obj):
            if hit(path):
                if point.when == "torn":  # dies while writing the temporary file atomic_path would rename
                    text = json.dumps(obj, indent=2) + "\n"
                    with open(str(path) + atomic.TMP_SUFFIX, "w") as f:
                        f.write(text[: len(text) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                die()
            real_json(path, obj)
        atomic.atomic_write_json = atomic_write_json
    elif point.target == "save_file":
        import safetensors.torch

        real_save = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            now = hit(filename)
            if now and point.when == "before":
                die()
            real_save(tensors, filename, metadata)
            if now:
                if point.when == "torn":
                    data = Path(filename).read_bytes()
                    Path(filename).write_bytes(data[: len(data) // 2])
                die()
        safetensors.torch.save_file = save_file
    elif point.target == "rmtree":
        import shutil

        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kw):
            if hit(path):  # killed partway through removing the folder
                real_rmtree(Path(path) / next(iter(os.listdir(path))))
                die()
            return real_rmtree(path, *args, **kw)
        shutil.rmtree = rmtree
    elif point.target == "log":
        import sae.logger

        real_log = sae.logger.MetricsLogger.log

        def log(self, record):
            if hit():
                line = json.dumps(record) + "\n"
                self.file.write(line[: len(line) // 2])
                self.file.flush()
                die()
            real_log(self, record)
        sae.logger.MetricsLogger.log = log
    elif ":" in point.target:
        import importlib

        module, qualname = point.target.split(":")
        owner_name, method = qualname.rsplit(".", 1)
        owner = importlib.import_module(module)
        for part in owner_name.split("."):
            owner = getattr(owner, part)
        real = getattr(owner, method)

        def patched(self, *args, **kw):
            if hit():
                die()
            return real(self, *args, **kw)
        setattr(owner, method, patched)
    else:
        raise SystemExit(f"unknown kill target {point.target!r}")


if __name__ == "__main__":
    arm(KillPoint(**json.loads(sys.argv[1])))
    from strata.cli import main

    sys.exit(main(sys.argv[2:]))
