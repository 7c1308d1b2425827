"""Time of each eval suite (absorption, probing, autointerp with the offline explainer) on a 6-SAE per-layer bank
of SmolLM2-135M, measured in one run (the machine may be shared: other processes slow every suite alike).

Harvests a small run of the embedded model (resid at 6 layers), trains a TopK bank on it briefly, then runs
`strata eval --suite absorption,probing,autointerp` and prints each suite's seconds and the total, against the
budget of 15 minutes for the full suite on a 2-core machine, and each SAE's headline metrics.

Usage: python scripts/bench_evals.py [--layers 3-18:3] [--tokens 40960] [--train-tokens 30000] [--keep DIR [--reuse]]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae.evaluate import EvalConfig, evaluate  # noqa: E402
from strata.cli import main  # noqa: E402

SUITES = ("absorption", "probing", "autointerp")
BUDGET_S = 15 * 60


def step(what: str, argv: list) -> float:
    t = time.perf_counter()
    if main([str(a) for a in argv]) != 0:
        raise SystemExit(f"bench_evals: {what} failed")
    return time.perf_counter() - t


def bench(run: Path, layers: str, tokens: int, train_tokens: int, reuse: bool = False) -> None:
    if not reuse:
        setup(run, layers, tokens, train_tokens)
    t = time.perf_counter()
    result = evaluate(EvalConfig(run_dir=str(run), name="bank", suite=",".join(SUITES)))
    total = time.perf_counter() - t
    report(result, total)


def setup(run: Path, layers: str, tokens: int, train_tokens: int) -> None:
    t_h = step("harvest", ["harvest", run, "--sites", "resid", "--layers", layers, "--max-tokens", tokens,
                           "--context", 128, "--shard-tokens", 4096, "--progress", "false"])
    t_t = step("train", ["train", run, "--name", "bank", "--arch", "topk", "--layers", layers, "--expansion", 8,
                         "--k", 32, "--max-tokens", train_tokens, "--batch-size", 1024, "--progress", "false"])
    print(f"setup: harvest {t_h:.0f} s, train {t_t:.0f} s (not part of the eval budget)", flush=True)


def report(result: dict, total: float) -> None:
    import os

    print("\nper-suite time, 6-SAE bank of SmolLM2-135M (this machine is shared: absolute seconds are noisy)")
    print(f"(1-minute load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"{'suite':>12}  {'seconds':>8}  share")
    for s in SUITES:
        sec = result["suites"][s]["seconds"]
        print(f"{s:>12}  {sec:8.1f}  {sec / total:5.0%}")
    print(f"{'total':>12}  {total:8.1f}  (budget {BUDGET_S} s: {'within' if total <= BUDGET_S else 'OVER'}, "
          f"{total / BUDGET_S:.2f} of it)")
    print("\nper SAE:")
    for sid, r in result["saes"].items():
        o = r["overall"]
        print(f"{sid:>10}: absorption {o['absorption_mean']:.3f} (full {o['absorption_full']:.3f}, "
              f"{o['absorption_letters_scored']:.0f} letters)  probing k1 {o['probing_k1_accuracy']:.3f} "
              f"k5 {o['probing_k5_accuracy']:.3f} k20 {o['probing_k20_accuracy']:.3f} raw "
              f"{o['probing_full_accuracy']:.3f}  detection {o['autointerp_detection_mean']:.3f} "
              f"fuzzing {o['autointerp_fuzzing_mean']:.3f}")


def main_cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="3-18:3", help="resid layers of the bank (6 by default)")
    ap.add_argument("--tokens", type=int, default=40960, help="tokens harvested")
    ap.add_argument("--train-tokens", type=int, default=30000, help="tokens each SAE trains on")
    ap.add_argument("--keep", default="", help="harvest into this folder and keep it (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="with --keep: the folder already holds the harvest and the "
                                                         "trained bank from an earlier --keep run; only evaluate")
    args = ap.parse_args()
    if args.keep:
        bench(Path(args.keep), args.layers, args.tokens, args.train_tokens, args.reuse)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-evals-"))
    try:
        bench(tmp / "run", args.layers, args.tokens, args.train_tokens)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main_cli()
