"""Run `strata ARGS...` and have the process SIGKILL itself at a chosen point, as a power cut or the OOM killer
would (tests/test_crash_safety_harvest.py). The product code has no hooks: this wrapper patches, from outside,
the calls every write goes through.

usage: python tests/kill_at.py POINT N ARGS...

POINT is one of
  replace-before  just before the N-th os.replace into the run (a complete temporary file not yet in place)
  replace-after   just after the N-th os.replace into the run
  manifest-torn   while the N-th manifest.json is written: half of it is in the temporary file
  append          while the N-th block of rows is appended to an activation shard file
  close           just before the N-th activation shard file is finished
"""
from __future__ import annotations

import os
import pathlib
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def counter(n: int):
    state = {"calls": 0}

    def hit() -> bool:
        state["calls"] += 1
        return state["calls"] == n

    return hit


def arm(point: str, n: int) -> None:
    hit = counter(n)
    if point in ("replace-before", "replace-after"):
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            mine = pathlib.Path(dst).suffix in (".json", ".h5")
            if mine and point == "replace-before" and hit():
                die()
            real_replace(src, dst, *a, **kw)
            if mine and point == "replace-after" and hit():
                die()

        os.replace = replace
    elif point == "manifest-torn":
        real_write = pathlib.Path.write_bytes

        def write_bytes(self, data):
            if self.name == "manifest.json.partial" and hit():
                with open(self, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                die()
            return real_write(self, data)

        pathlib.Path.write_bytes = write_bytes
    elif point in ("append", "close"):
        from activations.shards import ActivationShardWriter

        real = getattr(ActivationShardWriter, point)

        def patched(self, *args):
            if hit():
                die()
            return real(self, *args)

        setattr(ActivationShardWriter, point, patched)
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    from strata.cli import main

    sys.exit(main(sys.argv[3:]))
