"""Strata's TopK training step beside EleutherAI sparsify's on the same device, same shapes, same batches.

Both: TopK SAE, d=576 (SmolLM2), 4,608 latents, k=32, batch 4,096, Adam, decoder kept unit-norm with the
gradient parallel to each decoder row removed, FVU loss. Strata: sae.optim.SAEStepper in the precision
`--precision auto` picks on this device (bf16 encoder matmul where fast). sparsify: SparseCoder under its own
bf16 autocast (on CUDA) with torch.optim.Adam, the step its trainer takes. Each timing is the best of
interleaved rounds (the machine may be shared).

    python scripts/bench_sparsify.py [--device cuda] [--steps 20] [--rounds 3] [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from activations.precision import resolve  # noqa: E402
from sae.config import SAEConfig  # noqa: E402
from sae.models import build_sae  # noqa: E402
from sae.optim import SAEStepper, default_lr  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def strata_step(d: int, n: int, k: int, device: torch.device, dtype: torch.dtype):
    cfg = SAEConfig(arch="topk", d_in=d, d_out=d, n_latents=n, k=k, in_keys=["x"], out_keys=["x"],
                    in_scales=[1.0], out_scales=[1.0], k_aux=d // 2)
    sae = build_sae(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    sae.to(device)
    sae.set_compute_dtype(dtype)
    stepper = SAEStepper(sae, default_lr(n), total_steps=100_000, warmup_steps=0)
    state = {"s": 0}

    def step(x):
        stepper.step(x, x, state["s"])
        state["s"] += 1
    return step


def sparsify_step(d: int, n: int, k: int, device: torch.device):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=default_lr(n), eps=6.25e-10)

    def step(x):
        out = sae(x, dead_mask=torch.zeros(n, dtype=torch.bool, device=device))
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
    return step


def tokens_per_s(step, xs: list, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    for x in xs:
        step(x)
    _sync(device)
    return sum(x.shape[0] for x in xs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--n", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke test of the script (CPU dry run)")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.n, args.batch, args.steps, args.rounds = 1152, 256, 2, 1
    device = torch.device(args.device)
    prec = resolve("auto", device, [(args.batch, args.d, args.n)])
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(args.batch, args.d, generator=g).to(device) for _ in range(args.steps)]
    steps = {"strata": strata_step(args.d, args.n, args.k, device, prec.dtype)}
    try:
        steps["sparsify"] = sparsify_step(args.d, args.n, args.k, device)
    except ImportError as e:
        print(f"sparsify is not importable here ({e}); install eai-sparsify to compare (see scripts/gpu_check.sh)")
    for step in steps.values():  # warm-up: allocations, kernel selection, Triton compiles
        step(xs[0])
        step(xs[0])
    best = dict.fromkeys(steps, 0.0)
    for _ in range(args.rounds):
        for name, step in steps.items():
            best[name] = max(best[name], tokens_per_s(step, xs, device))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"TopK d={args.d}, {args.n} latents, k={args.k}, batch {args.batch} on {where}; strata in {prec.name} "
          f"({prec.reason})")
    for name, rate in best.items():
        print(f"  {name}: {rate:,.0f} tok/s")
    if "sparsify" in best:
        print(f"  strata / sparsify: {best['strata'] / best['sparsify']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens_per_s": best, "precision": prec.record(), "args": vars(args)},
                                              indent=1))


if __name__ == "__main__":
    main()
