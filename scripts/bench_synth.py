"""The synthetic depth benchmark: every architecture x mode trained on one `strata synth` run and scored by
`strata eval --suite truth` against the features that made it, printed as one table.

Columns (sae/evals/truth.py; a true feature is recovered at decoder cosine >= 0.9): MMCS, recall, precision, F1
of recovered features (means over the SAEs and keys of that training run), layer-profile IoU against the true
lifetimes (multi-layer SAEs, crosscoders), and for per-layer banks the F1 of the cross-layer matches that
`strata analyze` wrote, per method found in the index, against the true lineage; FVU from the core suite; the
training time (config written to last checkpoint). Every training uses the same flags apart from --arch and --mode.

    python scripts/bench_synth.py [--out DIR] [--layers 3] [--d-model 32] [--features 64] [--tokens 65536]
                                  [--archs topk,batchtopk,jumprelu,relu] [--modes layer,multilayer,transcoder,crosscoder]
    python scripts/bench_synth.py --out DIR --report     # the table of what a kept --out run has evaluated so far
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from activations import layout
from strata.cli import main

ARCHS = "topk,batchtopk,jumprelu,relu"
MODES = "layer,multilayer,transcoder,crosscoder"


def strata(*args) -> None:
    code = main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"`strata {' '.join(map(str, args))}` failed with exit status {code}")


def mean_of(saes: dict, metric: str) -> float:
    vals = [r["overall"][metric] for r in saes.values() if r["overall"].get(metric) is not None]
    return float(np.mean(vals)) if vals else float("nan")


def train_and_eval(run: Path, arch: str, mode: str, train_flags: list, analyze: bool) -> dict:
    name = f"{arch}-{mode}"
    strata("train", run, "--name", name, "--arch", arch, "--mode", mode, *train_flags)
    if analyze:
        strata("analyze", run, "--name", name, "--device", "cpu", "--explainer", "none", "--precision", "fp32")
    strata("eval", run, "--name", name, "--suite", "core,truth", "--device", "cpu", "--precision", "fp32")
    return read_row(run, name)


def read_row(run: Path, name: str) -> dict:
    """One table row from train/<name>/eval.json; training time from its config.json to its last checkpoint."""
    tdir = layout.train_dir(run, name)
    result = json.loads((tdir / "eval.json").read_text())
    saes = result["saes"]
    matching = result["suites"]["truth"]["details"].get("matching")
    seconds = (tdir / "checkpoint" / "state.json").stat().st_mtime - (tdir / "config.json").stat().st_mtime
    arch, _, mode = name.partition("-")
    return {"arch": arch, "mode": mode, "fvu": mean_of(saes, "fvu"), "mmcs": mean_of(saes, "truth_mmcs"),
            "recall": mean_of(saes, "truth_recall"), "precision": mean_of(saes, "truth_precision"),
            "f1": mean_of(saes, "truth_f1"), "profile_iou": mean_of(saes, "truth_profile_iou"),
            "matching": matching if isinstance(matching, dict) else {}, "train_s": seconds}


def fmt(v: float) -> str:
    return "–" if v != v else f"{v:.3f}"


def table(rows: list[dict]) -> str:
    methods = sorted({m for r in rows for m in r["matching"]})
    head = ["arch", "mode", "FVU", "MMCS", "recall", "precision", "F1", "profile IoU",
            *(f"match F1 ({m})" for m in methods), "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        match = [fmt(r["matching"][m]["f1"]) if m in r["matching"] else "–" for m in methods]
        cells = [r["arch"], r["mode"], *(fmt(r[c]) for c in ("fvu", "mmcs", "recall", "precision", "f1", "profile_iou")),
                 *match, f"{r['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="folder for the run (default: a temporary folder, removed after)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-latents", type=int, default=128)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--archs", default=ARCHS)
    ap.add_argument("--modes", default=MODES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--report", action="store_true", help="only print the table of the trainings evaluated in --out")
    args = ap.parse_args()
    if args.report:
        run = Path(args.out) / "synth"
        names = [f"{a}-{m}" for a in args.archs.split(",") for m in args.modes.split(",")]
        print(table([read_row(run, n) for n in names if (layout.train_dir(run, n) / "eval.json").is_file()]))
        return

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="strata-bench-synth-"))
    run = root / "synth"
    try:
        t0 = time.perf_counter()
        strata("synth", run, "--layers", args.layers, "--d-model", args.d_model, "--features", args.features,
               "--tokens", args.tokens,
               "--seed", args.seed, "--sites", "resid,mlp_in,mlp_out", *(["--resume"] if run.exists() else []))
        print(f"synth: {time.perf_counter() - t0:.1f} s")
        flags = ["--n-latents", args.n_latents, "--k", args.k, "--batch-size", args.batch_size, "--epochs", args.epochs,
                 "--progress", "false", "--device", args.device, "--precision", "fp32", "--overwrite"]
        rows = [train_and_eval(run, arch, mode, flags, analyze=(mode == "layer"))
                for arch in args.archs.split(",") for mode in args.modes.split(",")]
        print(f"\nstrata synth --layers {args.layers} --d-model {args.d_model} --features {args.features} "
              f"--tokens {args.tokens} "
              f"--seed {args.seed}; train --n-latents {args.n_latents} --k {args.k} --batch-size {args.batch_size} "
              f"--epochs {args.epochs}\n")
        print(table(rows))
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main_bench()
