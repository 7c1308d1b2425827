"""Cross-layer transcoder training throughput beside per-layer transcoders, measured side by side in one run.

Setting: L layers of width d, n latents and k active per layer, batch B, TopK with AuxK, Adam (the real training
step of `strata train --mode clt` and `--mode transcoder`). The CLT steps once on the L mlp_in/mlp_out blocks
of a batch; the transcoders step once each on their own block of the same batch. A token is all L layers of it,
so the two tokens/s compare directly. The CLT's encoders cost the same as the transcoders'; its decoders write
every later layer too ((L + 1) / 2 times the transcoders' decoder parameters and sparse-decode work).
Figures are the fastest of the timed steps (on a shared machine, the step least disturbed); rounds alternate
CLT and transcoders so machine noise hits both alike.

    python scripts/bench_clt.py [--layers 4] [--steps 3] [--rounds 2] [--threads N] [--quick]
"""
from __future__ import annotations

import argparse
import time

import torch

from sae.base import FVU
from sae.config import SAEConfig
from sae.models import build_sae
from sae.optim import SAEStepper, default_lr


def steppers(L: int, d: int, n: int, k: int):
    common = dict(arch="topk", k=k, apply_b_dec_to_input=False, normalize_decoder=False, k_aux=d // 2)
    clt = build_sae(SAEConfig(d_in=L * d, d_out=L * d, n_latents=L * n, mode="clt",
                              in_keys=[f"mlp_in.{i}" for i in range(L)], out_keys=[f"mlp_out.{i}" for i in range(L)],
                              in_scales=[1.0] * L, out_scales=[1.0] * L, **common))
    bank = [build_sae(SAEConfig(d_in=d, d_out=d, n_latents=n, mode="transcoder", in_keys=[f"mlp_in.{i}"],
                                out_keys=[f"mlp_out.{i}"], in_scales=[1.0], out_scales=[1.0], **common))
            for i in range(L)]
    clt_st = SAEStepper(clt, default_lr(n), total_steps=10_000, warmup_steps=0)
    bank_st = [SAEStepper(sae, default_lr(n), total_steps=10_000, warmup_steps=0) for sae in bank]
    loss_fn = FVU(blocks=L, dim=1, reduce="sum")

    def clt_step(x, y, s):
        clt_st.step(x, y, s, loss_fn)

    def bank_step(x, y, s):
        for i, st in enumerate(bank_st):
            st.step(x[:, i * d:(i + 1) * d], y[:, i * d:(i + 1) * d], s)
    return clt_step, bank_step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    L = a.layers
    d, n, k, B = (64, 512, 8, 256) if a.quick else (576, 4608, 32, 4096)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {L} layers, d={d} n={n} per layer, k={k} "
          f"per layer, batch={B}, fp32")
    torch.manual_seed(0)
    x, y = torch.randn(B, L * d), torch.randn(B, L * d)
    contenders = dict(zip(("CLT", f"{L} per-layer transcoders"), steppers(L, d, n, k)))
    best = {name: float("inf") for name in contenders}
    step = 0
    for fn in contenders.values():  # warm-up (allocations, first-call overheads)
        fn(x, y, step)
    for _ in range(a.rounds):
        for name, fn in contenders.items():
            for _ in range(a.steps):
                step += 1
                t = time.perf_counter()
                fn(x, y, step)
                best[name] = min(best[name], time.perf_counter() - t)
    rates = {name: B / t for name, t in best.items()}
    clt_rate, bank_rate = rates.values()
    for name, r in rates.items():
        print(f"{name:>26}: {r:8.0f} tok/s (fastest step)")
    print(f"CLT at {clt_rate / bank_rate:.2f}x the transcoders' rate; it has {(L + 1) / 2:.1f}x their decoder parameters")


if __name__ == "__main__":
    main()
