"""Training throughput beside the peers and this machine's matmul roofline, measured side by side in one run.

Setting: TopK, d=576, 4,608 latents, k=32, batch 4,096, Adam (the issue's reference shape). Contenders, each
timed on its own real training step (its SAE's forward and backward and its optimiser step, as its trainer
runs them), on the same batch, the same shapes and the same thread count:

  strata fp32, strata bf16   SAEStepper.step: AuxK on, decoder unit-norm, grad clip (what `strata train` runs)
  sparsify fp32              EleutherAI sparsify's SparseCoder + torch Adam + its trainer's per-step work
                             (parallel-gradient removal, linear schedule, dead-latent counts); if importable
  saelens fp32               SAELens TopKTrainingSAE.training_forward_pass + its trainer's _train_step
                             (firing statistics, grad clip 1.0, Adam, scheduler); if importable

The contenders run interleaved, round after round (A/B/C/A/B/C...), so machine noise hits all alike; the figures
are medians over every timed step. The roofline is measured the same way, interleaved: the encoder's own
[B, d] x [d, n] matmul in fp32 and in bf16, both as a plain `x @ w` (allocating its output: the issue's
roofline) and into a reused output buffer (the strict roofline, no page faults on a fresh output).
roofline tok/s = matmul FLOP/s / FLOP per token, FLOP per token = 2*d*n (dense encoder forward) + 10*k*d (sparse
decode forward and backward, sparse encoder backward); a contender's "% of roofline" uses the roofline of the
precision of its encoder matmul.

The peers are optional: install them into a side folder and put it on the path, e.g.
    pip install --no-deps --target /tmp/peers eai-sparsify einops natsort simple-parsing schedulefree
    PYTHONPATH=$PWD:/tmp/peers python scripts/bench_train.py [--rounds 5] [--steps 3] [--threads N] [--layers 1,2,4]
    ... --clock cpu     # on a busy shared machine: single-thread CPU time instead of wall time

--layers adds the per-layer bank's tokens/s per SAE as the number of layers grows (each SAE steps on its own
layer's batch, as `strata train --mode layer` does).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from activations.precision import resolve
from sae import cpu_select
from sae.config import SAEConfig
from sae.models import build_sae
from sae.optim import SAEStepper, default_lr

TOTAL_STEPS = 10_000  # schedules sized for a long run: every timed step is in the constant-lr phase


def strata_step(d, n, k, dtype):
    cfg = SAEConfig(arch="topk", d_in=d, d_out=d, n_latents=n, k=k, in_keys=["x"], out_keys=["x"],
                    in_scales=[1.0], out_scales=[1.0], k_aux=d // 2)
    sae = build_sae(cfg)
    sae.set_compute_dtype(dtype)
    stepper = SAEStepper(sae, default_lr(n), total_steps=TOTAL_STEPS, warmup_steps=0)
    return lambda x, i: stepper.step(x, x, i)


def sparsify_step(d, n, k):
    """sparsify's Trainer.fit body for one batch with loss_fn="fvu", optimizer="adam", no accumulation."""
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device="cpu", dtype=torch.float32)
    adam = torch.optim.Adam(sae.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)
    sched = get_linear_schedule_with_warmup(adam, 0, TOTAL_STEPS)
    since_fired = torch.zeros(n, dtype=torch.long)
    did_fire = torch.zeros(n, dtype=torch.bool)
    auxk_alpha, dead_threshold = 1 / 32, 10_000_000  # AuxK on, as in Strata's step

    def step(x, i):
        dead_mask = since_fired > dead_threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        adam.step()
        adam.zero_grad()
        sched.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()
    return step


def saelens_step(d, n, k):
    """SAELens SAETrainer._train_step for a TopK training SAE (Adam, grad clip 1.0, constant lr)."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32", device="cpu"))
    adam = torch.optim.Adam(sae.parameters(), lr=default_lr(n), betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda s: 1.0)
    since_fired = torch.zeros(n)
    act_freq = torch.zeros(n)
    dead_window = 1000

    def step(x, i):
        sae.train()
        out = sae.training_forward_pass(step_input=TrainStepInput(
            sae_in=x, dead_neuron_mask=(since_fired > dead_window).bool(), coefficients={},
            n_training_steps=i, is_logging_step=False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
            act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        adam.step()
        adam.zero_grad()
        sched.step()
    return step


def matmul_step(B, d, n, dtype, into_buffer: bool):
    """The encoder matmul alone: `x @ w` allocating its [B, n] output each call (the issue's roofline), or written
    into one reused buffer (no page faults on a fresh 38/75 MB output: the stricter roofline; Strata's step writes
    its pre-activations into a reused buffer, so it is the fair one to compare it with)."""
    x, w = torch.randn(B, d).to(dtype), torch.randn(n, d).to(dtype).t()  # W_enc layout used in training
    if not into_buffer:
        return lambda _x, _i: x @ w
    out = torch.empty(B, n, dtype=dtype)
    return lambda _x, _i: torch.matmul(x, w, out=out)


def peer(name: str, make, pip_name: str):
    try:
        return make()
    except ImportError as e:
        print(f"{name}: not installed (pip install {pip_name}) [{e}]")
    except Exception as e:  # an installed version whose API differs: say so and time the others
        print(f"{name}: installed but could not be set up ({type(e).__name__}: {e}); left out")
    return None


def interleaved(contenders: dict, x: torch.Tensor, rounds: int, steps: int, clock) -> dict:
    """Median seconds per call of each contender, the contenders taking turns every `steps` calls."""
    times = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up: allocations, first-call overheads
        fn(x, 0)
    i = 1
    for _ in range(rounds):
        for name, fn in contenders.items():
            for s in range(steps):
                t = clock()
                fn(x, i + s)
                times[name].append(clock() - t)
        i += steps
    return {name: statistics.median(ts) for name, ts in times.items()}


def bank(d, n, k, B, layers: list[int], steps: int, clock) -> None:
    base = None
    for L in layers:
        fns = [strata_step(d, n, k, torch.float32) for _ in range(L)]
        xs = [torch.randn(B, d) for _ in range(L)]
        for fn, x in zip(fns, xs):
            fn(x, 0)
        times = []
        for s in range(1, max(2, steps // L) + 1):
            t = clock()
            for fn, x in zip(fns, xs):
                fn(x, s)
            times.append(clock() - t)
        rate = B / statistics.median(times)
        base = base or rate * L
        print(f"per-layer bank, {L} SAE(s): {rate:8.0f} batch tok/s, {rate * L:8.0f} SAE-tok/s summed "
              f"({rate * L / base:5.1%} of the 1-SAE rate)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each contender runs once per round)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    ap.add_argument("--layers", default="", help="also time a per-layer bank of these sizes, e.g. 1,2,4")
    ap.add_argument("--no-peers", action="store_true", help="skip sparsify and SAELens even if installed")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for every measurement (0 = torch default); "
                    "on a shared machine use the number of idle cores")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (a quiet machine); cpu: the CPU time of the one thread doing the work "
                    "(implies --threads 1; on a busy shared machine it leaves out the time spent waiting for a core)")
    a = ap.parse_args()
    if a.clock == "cpu":
        a.threads = 1
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.thread_time if a.clock == "cpu" else time.perf_counter
    d, n, k, B = (64, 512, 8, 256) if a.quick else (576, 4608, 32, 4096)
    flop_per_token = 2 * d * n + 10 * k * d
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d={d} n_latents={n} k={k} batch={B}; "
          f"{a.rounds} rounds x {a.steps} steps, interleaved, medians of {a.clock} time")
    auto = resolve("auto", torch.device("cpu"), [(B, d, n)])
    print(f"--precision auto: {auto.line()}")
    print(f"top-k selection: {cpu_select.status()}")

    torch.manual_seed(0)
    contenders = {f"matmul {p}{tag}": matmul_step(B, d, n, dt, tag == " buf")
                  for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)) for tag in ("", " buf")}
    contenders |= {"strata fp32": strata_step(d, n, k, torch.float32),
                   "strata bf16": strata_step(d, n, k, torch.bfloat16)}
    if a.no_peers:
        print("sparsify, saelens: skipped (--no-peers)")
    else:
        for name, make, pip_name in (("sparsify fp32", lambda: sparsify_step(d, n, k), "eai-sparsify"),
                                     ("saelens fp32", lambda: saelens_step(d, n, k), "sae-lens")):
            step = peer(name.split()[0], make, pip_name)
            if step is not None:
                contenders[name] = step
    x = torch.randn(B, d)
    med = interleaved(contenders, x, a.rounds, a.steps, clock)

    roof, strict = {}, {}
    for prec in ("fp32", "bf16"):
        gflops = 2 * B * d * n / med.pop(f"matmul {prec}") / 1e9
        gflops_buf = 2 * B * d * n / med.pop(f"matmul {prec} buf") / 1e9
        roof[prec], strict[prec] = gflops * 1e9 / flop_per_token, gflops_buf * 1e9 / flop_per_token
        print(f"roofline {prec}: encoder matmul {gflops:7.1f} GFLOP/s -> {roof[prec]:8.0f} tok/s; into a reused "
              f"buffer {gflops_buf:7.1f} GFLOP/s -> {strict[prec]:8.0f} tok/s (strict)")
    rates = {name: B / s for name, s in med.items()}
    ref = rates.get("sparsify fp32")
    print(f"{'contender':<15} {'tok/s':>8} {'÷ sparsify fp32':>16} {'% of roofline':>14} {'% of strict':>12}")
    for name, rate in rates.items():
        ratio = f"{rate / ref:15.2f}x" if ref else f"{'n/a':>16}"
        prec = name.split()[1]
        print(f"{name:<15} {rate:8.0f} {ratio} {rate / roof[prec]:13.1%} {rate / strict[prec]:11.1%}")
    if a.layers:
        bank(d, n, k, B, [int(s) for s in a.layers.split(",")], a.steps * a.rounds, clock)


if __name__ == "__main__":
    main()
