"""Does bf16 cost quality? One harvest of SmolLM2 (embedded), the same SAE config trained and evaluated once in
fp32 and once in bf16 (`--precision`), held-out FVU and CE / KL loss recovered printed side by side with their
differences (issue 13's bar: within 0.01 of fp32).

Both trainings read the same shards in the same order from the same init (seed 0); only the dtype of the dense
encoder matmul (training) and of the model forward and SAE encoder (eval) differ. Weights and Adam state are
fp32 in both.

    python scripts/bench_precision.py [--layer 9] [--tokens 65536] [--epochs 2] [--ce-contexts 32] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from activations.config import HarvestConfig  # noqa: E402
from activations.harvest import harvest  # noqa: E402
from sae.evaluate import EvalConfig, evaluate  # noqa: E402
from sae.train import train  # noqa: E402
from sae.train_config import TrainConfig  # noqa: E402

METRICS = [("held-out FVU", "fvu"), ("CE loss recovered", "ce_loss_recovered"), ("KL recovered", "kl_recovered"),
           ("L0", "l0")]


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=9, help="residual-stream layer to train on")
    ap.add_argument("--tokens", type=int, default=65536, help="harvest budget")
    ap.add_argument("--shard-tokens", type=int, default=8192)
    ap.add_argument("--harvest-precision", default="fp32", choices=["auto", "fp32", "bf16"],
                    help="precision of the one harvest both trainings read")
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ce-contexts", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    key = f"resid.{args.layer}"
    with tempfile.TemporaryDirectory() as tmp:
        run = str(Path(tmp) / "run")
        t = time.perf_counter()
        quiet(harvest, HarvestConfig(run_dir=run, model=args.model, sites="resid", layers=str(args.layer),
                                     max_tokens=args.tokens, shard_tokens=args.shard_tokens,
                                     precision=args.harvest_precision, device=args.device, progress=False))
        print(f"harvest: {args.tokens:,} tokens of {key} in {time.perf_counter() - t:.0f} s ({args.harvest_precision})")
        results = {}
        for prec in ("fp32", "bf16"):
            t = time.perf_counter()
            quiet(train, TrainConfig(run_dir=run, name=prec, layers=str(args.layer), expansion=args.expansion, k=args.k,
                                     batch_size=args.batch_size, epochs=args.epochs, precision=prec, device=args.device,
                                     progress=False))
            r = quiet(evaluate, EvalConfig(run_dir=run, name=prec, ce_contexts=args.ce_contexts, precision=prec,
                                           device=args.device))
            results[prec] = r["saes"][key]["overall"]
            print(f"train + eval in {prec}: {time.perf_counter() - t:.0f} s")
    a, b = results["fp32"], results["bf16"]
    print(f"\nTopK {args.expansion}x, k={args.k}, {args.epochs} epoch(s), {key}; held-out shards, "
          f"{args.ce_contexts} contexts for loss recovered")
    print(f"{'metric':>20} {'fp32':>9} {'bf16':>9} {'bf16-fp32':>10}")
    diffs = {}
    for label, m in METRICS:
        diffs[m] = b[m] - a[m]
        bar = "  (target |diff| <= 0.01)" if m != "l0" else ""
        print(f"{label:>20} {a[m]:>9.4f} {b[m]:>9.4f} {diffs[m]:>+10.4f}{bar}")
    if args.json:
        Path(args.json).write_text(json.dumps({"fp32": a, "bf16": b, "diff": diffs, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
