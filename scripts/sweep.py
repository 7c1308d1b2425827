"""Train a grid or random search of SAE configs on one harvest run, then write a summary and an L0-FVU frontier.

    python scripts/sweep.py sweep.yaml [--parallel N] [--dry-run]

The config format and the files written are described in strata/sweep.py and strata/sweep_report.py.
Exit status: 0 when every member finished, 1 when some failed, 2 for a bad config (nothing written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from strata.cli import report_errors  # noqa: E402
from strata.sweep import run_sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="sweep YAML/JSON file (run, base, grid or random, parallel, eval)")
    p.add_argument("--parallel", type=int, default=None, help="members training at once (overrides `parallel:`)")
    p.add_argument("--dry-run", action="store_true", help="print each member's command and state; run nothing")
    args = p.parse_args(argv)
    return report_errors("sweep", lambda: 1 if run_sweep(args.config, args.parallel, args.dry_run) else 0,
                         "interrupted; rerun the same command to resume (finished members are skipped)")


if __name__ == "__main__":
    sys.exit(main())
