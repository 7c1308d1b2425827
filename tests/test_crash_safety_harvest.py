"""A harvest killed with SIGKILL at any point, then `strata harvest --resume`, gives the same files as a harvest
that was never interrupted: every file byte for byte, manifest included.

Each case runs the harvest in a subprocess through tests/kill_at.py, which makes the process kill itself at one
point: around the first manifest write (torn, complete but not yet renamed, in place), inside the first shard,
between the files of a shard commit, mid-shard, during the manifest update that records a shard, and around the
final manifest. The run: 2 keys, 4 shards of 128 tokens, so every os.replace into the run is numbered:
  1 first manifest (no shards) | 2-5 shard 0: tokens, resid.1, resid.2, manifest | 6-9 shard 1 | 10-13 shard 2 |
  14-17 shard 3 | 18 final manifest (complete)
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from kill_at import KillPoint, run_until_killed

from activations.manifest import load_manifest
from activations.verify import verify_run
from strata.cli import main

FLAGS = ["--sites", "resid", "--layers", "1,2", "--context", "32", "--batch-contexts", "2", "--shard-tokens", "128",
         "--max-tokens", "512", "--progress", "false"]

FILES = [".json", ".h5"]  # every os.replace into the run


def replace(when: str, n: int) -> KillPoint:
    return KillPoint(f"replace-{when}-{n}", "replace", n, when, FILES)


def manifest_torn(n: int) -> KillPoint:
    return KillPoint(f"manifest-torn-{n}", "json", n, "torn", "manifest.json")


def before_call(method: str, n: int) -> KillPoint:
    return KillPoint(f"{method}-{n}", f"activations.shards:ActivationShardWriter.{method}", n)


KILL_POINTS = [
    manifest_torn(1),          # the very first manifest.json write, half written
    replace("before", 1),      # first manifest complete in its temporary file, not yet in place
    replace("after", 1),       # first manifest in place, no shard yet
    before_call("append", 1),  # the first rows of shard 0
    replace("before", 2),      # shard 0's tokens file complete, not yet renamed
    replace("after", 3),       # shard 0's tokens and resid.1 files in place, the manifest does not list them
    manifest_torn(2),          # the manifest that records shard 0, half written
    replace("before", 5),      # shard 0's files in place, its manifest written but not renamed
    replace("after", 5),       # shard 0 committed
    before_call("append", 7),  # in the middle of shard 1
    before_call("close", 3),   # shard 1's first activation file being finished
    replace("before", 9),      # shard 1's manifest update not yet in place
    replace("after", 12),      # between shard 2's activation files
    manifest_torn(6),          # the final manifest (complete) half written
    replace("before", 18),     # the final manifest written, not yet renamed
    replace("after", 18),      # everything in place, killed before exiting
]


def files(run: Path) -> dict[str, str]:
    """sha256 of every file in the run (lock files are not content)."""
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".strata.lock"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(["harvest", str(run), "--model", str(tiny_llama), *FLAGS]) == 0
    m = load_manifest(run)
    assert m.complete and len(m.shards) == 4 and len(m.keys) == 2
    return run


@pytest.mark.parametrize("point", KILL_POINTS, ids=[p.id for p in KILL_POINTS])
def test_resume_after_sigkill_gives_the_uninterrupted_files(point, reference, tmp_path, tiny_llama):
    run = tmp_path / "run"
    argv = ["harvest", str(run), "--model", str(tiny_llama), *FLAGS]
    killed = run_until_killed(point, argv)
    assert killed.returncode == -9, f"not killed at {point.id}: exit {killed.returncode}\n{killed.stderr[-2000:]}"
    assert main([*argv, "--resume"]) == 0
    a, b = load_manifest(run), load_manifest(reference)
    assert a.complete and [s.__dict__ for s in a.shards] == [s.__dict__ for s in b.shards], "same shard records"
    assert files(run) == files(reference), "every file byte-identical to the uninterrupted run's"
    assert verify_run(run) == []
