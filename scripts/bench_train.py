"""Training throughput next to this machine's matmul roofline, measured side by side in one run.

Prints: what `--precision auto` picks on this machine and what resolving it cost; matmul GFLOP/s (the encoder's
own [B, d] x [d, n] shape) in fp32, bf16 and the auto choice; TopK training tokens/s at d=576, 4608 latents,
k=32, batch 4096 (Adam, AuxK on, decoder unit-norm, grad clip: the real training step) in each, and its ratio
to the roofline-implied tokens/s; then the per-layer bank's tokens/s per SAE as
the number of layers grows (each SAE steps on its own layer's batch, as `strata train --mode layer` does).

roofline-implied tokens/s = matmul FLOP/s / FLOP per token, FLOP per token = 2*d*n (dense encoder forward)
+ 10*k*d (sparse decode forward and backward, sparse encoder backward).

    python scripts/bench_train.py [--steps 6] [--layers 1,2,4] [--threads N] [--quick]
"""
from __future__ import annotations

import argparse
import time

import torch

from activations.precision import resolve
from sae.config import SAEConfig
from sae.models import build_sae
from sae.optim import SAEStepper, default_lr


def matmul_gflops(B: int, d: int, n: int, dtype, reps: int) -> float:
    x, w = torch.randn(B, d).to(dtype), torch.randn(n, d).to(dtype).t()  # W_enc layout used in training
    x @ w
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - t)
    return 2 * B * d * n / best / 1e9


def make_stepper(d, n, k, dtype, steps):
    cfg = SAEConfig(arch="topk", d_in=d, d_out=d, n_latents=n, k=k, in_keys=["x"], out_keys=["x"],
                    in_scales=[1.0], out_scales=[1.0], k_aux=d // 2)
    sae = build_sae(cfg)
    sae.compute_dtype = dtype
    return SAEStepper(sae, default_lr(n), total_steps=10_000, warmup_steps=0)


def train_tokens_per_s(d, n, k, B, dtype, steps: int, n_saes: int = 1) -> tuple[float, float]:
    """(tokens/s of the fastest step, mean tokens/s): on a shared machine the fastest step is the one to set
    beside the fastest matmul; the mean is what a run of that length got."""
    torch.manual_seed(0)
    steppers = [make_stepper(d, n, k, dtype, steps) for _ in range(n_saes)]
    xs = [torch.randn(B, d) for _ in range(n_saes)]
    for st, x in zip(steppers, xs):  # warm-up step (allocations, first-call overheads)
        st.step(x, x, 0)
    times = []
    for s in range(1, steps + 1):
        t = time.perf_counter()
        for st, x in zip(steppers, xs):
            st.step(x, x, s)
        times.append(time.perf_counter() - t)
    return B / min(times), B * len(times) / sum(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", default="1,2,4")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for every measurement (0 = torch default); "
                    "on a shared machine use the number of idle cores")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    d, n, k, B = (64, 512, 8, 256) if a.quick else (576, 4608, 32, 4096)
    flop_per_token = 2 * d * n + 10 * k * d
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d={d} n_latents={n} k={k} batch={B}")
    t = time.perf_counter()
    auto = resolve("auto", torch.device("cpu"), [(B, d, n)])
    print(f"--precision auto: {auto.line()}; resolving took {time.perf_counter() - t:.3f} s "
          f"(a cached probe costs ~0)")
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), (f"auto={auto.name}", auto.dtype)):
        gf = matmul_gflops(B, d, n, dt, reps=5)
        implied = gf * 1e9 / flop_per_token
        best, mean = train_tokens_per_s(d, n, k, B, dt, a.steps)
        print(f"{name}: matmul {gf:7.1f} GFLOP/s -> roofline-implied {implied:8.0f} tok/s; TopK training "
              f"{best:8.0f} tok/s (best step) = {best / implied:5.1%} of roofline, {mean:8.0f} tok/s mean")
    base = None
    for L in [int(s) for s in a.layers.split(",")]:
        best, mean = train_tokens_per_s(d, n, k, B, torch.float32, max(2, a.steps // L), n_saes=L)
        base = base or best * L
        print(f"per-layer bank, {L} SAE(s): {best:8.0f} batch tok/s, {best * L:8.0f} SAE-tok/s summed "
              f"({best * L / base:5.1%} of the 1-SAE rate), mean {mean:8.0f} batch tok/s")


if __name__ == "__main__":
    main()
