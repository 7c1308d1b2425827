"""Before/after of Strata's training step: two checkouts timed side by side in one run.

Each checkout gets its own worker process (its tree first on the path) holding bench_train.py's contenders: the
TopK step (or --arch batchtopk / matryoshka) in fp32 and in bf16 (d=576, 4,608 latents, k=32, batch 4,096, Adam,
AuxK on) and the encoder matmul in both precisions (the roofline). The workers take turns call by call, the order
swapped every round, so machine noise hits both alike; figures are medians. --clock cpu (one thread's CPU time) is
the usable one on a busy machine.

    python scripts/bench_train_ab.py /path/to/before /path/to/after [--rounds 10] [--steps 2] [--clock cpu]
        [--arch topk|batchtopk|matryoshka]
    (e.g. before: `git worktree add /tmp/before main`)
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

D, N, K, B = 576, 4608, 32, 4096
NAMES = ("matmul fp32", "matmul bf16", "strata fp32", "strata bf16")


def worker(threads: int, clock_name: str, arch: str) -> None:
    """Build the contenders of the checkout on sys.path, then step on command (stdin '<name>\\t<steps>', stdout the
    seconds of each step)."""
    import torch

    from sae.config import SAEConfig
    from sae.models import build_sae
    from sae.optim import SAEStepper, default_lr

    torch.set_num_threads(threads)
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter

    def strata(dtype):
        cfg = SAEConfig(arch=arch, d_in=D, d_out=D, n_latents=N, k=K, in_keys=["x"], out_keys=["x"],
                        in_scales=[1.0], out_scales=[1.0], k_aux=D // 2,
                        matryoshka_prefixes=[N // 16, N // 4, N] if arch == "matryoshka" else [])
        sae = build_sae(cfg)
        if hasattr(sae, "set_compute_dtype"):
            sae.set_compute_dtype(dtype)
        else:  # a checkout from before set_compute_dtype
            sae.compute_dtype = dtype
        stepper = SAEStepper(sae, default_lr(N), total_steps=10_000, warmup_steps=0)
        return lambda x, i: stepper.step(x, x, i)

    def matmul(dtype):
        a, w = torch.randn(B, D).to(dtype), torch.randn(N, D).to(dtype).t()
        return lambda _x, _i: a @ w

    torch.manual_seed(0)
    fns = dict(zip(NAMES, (matmul(torch.float32), matmul(torch.bfloat16), strata(torch.float32), strata(torch.bfloat16))))
    x = torch.randn(B, D)
    for fn in fns.values():  # warm-up
        fn(x, 0)
    print("ready", flush=True)
    i = 0
    for line in sys.stdin:
        name, steps = line.rstrip("\n").split("\t")
        times = []
        for _ in range(int(steps)):
            i += 1
            t = clock()
            fns[name](x, i)
            times.append(clock() - t)
        print(" ".join(f"{t:.6f}" for t in times), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path, help="checkout timed as 'before'")
    ap.add_argument("after", type=Path, help="checkout timed as 'after'")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per contender per turn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--arch", choices=("topk", "batchtopk", "matryoshka"), default="topk")
    a = ap.parse_args()
    if a.clock == "cpu":
        a.threads = 1
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    procs = {label: subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(a.threads), a.clock,
                                      a.arch],
                                     cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
             for label, tree in trees.items()}
    for label, p in procs.items():
        if p.stdout.readline().strip() != "ready":
            sys.exit(f"the worker for {trees[label]} did not start")
    times = {(label, name): [] for label in trees for name in NAMES}
    for r in range(a.rounds):
        order = list(procs.items()) if r % 2 == 0 else list(procs.items())[::-1]
        for name in NAMES:
            for label, p in order:
                p.stdin.write(f"{name}\t{a.steps}\n")
                p.stdin.flush()
                times[(label, name)] += [float(t) for t in p.stdout.readline().split()]
    for p in procs.values():
        p.stdin.close()
        p.wait()

    flop_per_token = 2 * D * N + 10 * K * D  # as bench_train.py
    print(f"{a.arch}: {a.rounds} rounds x {a.steps} steps, {a.threads} thread(s), medians of {a.clock} time")
    med = {key: statistics.median(ts) for key, ts in times.items()}
    for label, tree in trees.items():
        parts = [f"{label:6s} ({tree})"]
        for prec in ("fp32", "bf16"):
            gflops = 2 * B * D * N / med[(label, f"matmul {prec}")] / 1e9
            rate = B / med[(label, f"strata {prec}")]
            parts.append(f"{prec} {rate:6.0f} tok/s = {rate / (gflops * 1e9 / flop_per_token):5.1%} of {gflops:5.1f} GFLOP/s")
        print("  ".join(parts))
    for prec in ("fp32", "bf16"):
        before, after = med[("before", f"strata {prec}")], med[("after", f"strata {prec}")]
        print(f"strata {prec} step: before {before * 1e3:.1f} ms, after {after * 1e3:.1f} ms: {before / after:.3f}x faster")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
