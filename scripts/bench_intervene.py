"""Time one intervention re-run (`sae.circuits.intervene.intervene`: the clean and the edited pass with every
deeper SAE read at once) on a 64-token prompt of SmolLM2-135M, beside a bare forward pass of the same prompt in the
same run. The SAEs are a per-layer bank of freshly initialised TopK SAEs at resid.L for the chosen layers (their
weights do not change the cost). Prints medians and the ratio.

    PYTHONPATH=$PWD python scripts/bench_intervene.py [--layers 3,9,15,21,27] [--latents 4608] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from activations.model import load_model
from sae.circuits.intervene import Edit, intervene, steer
from sae.config import SAEConfig
from sae.models import build_sae

TEXT = ("The history of the city goes back to a small settlement on the river, where traders met to exchange "
        "grain, salt and cloth. Over the centuries it grew into a market town, then a port, and finally the capital "
        "of a province whose roads and canals connected it to every part of the country and beyond, and to the sea.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="3,9,15,21,27")
    ap.add_argument("--latents", type=int, default=4608)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model("smollm2-135m", device="cpu")
    d = lm.model.config.hidden_size
    saes = {}
    for layer in (int(x) for x in args.layers.split(",")):
        cfg = SAEConfig(arch="topk", d_in=d, d_out=d, n_latents=args.latents, k=32, in_keys=[f"resid.{layer}"],
                        out_keys=[f"resid.{layer}"], in_scales=[1.0], out_scales=[1.0])
        saes[f"resid.{layer}"] = build_sae(cfg).eval()
    ids = lm.tokenizer(TEXT, return_tensors="pt").input_ids[:, :args.tokens]
    assert ids.shape[1] == args.tokens, f"the text has only {ids.shape[1]} tokens"
    first = next(iter(saes))
    edits = [Edit(first, 7, 0.0, args.tokens // 2), Edit(first, 11, 2.0)]

    def forward():
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)

    def rerun():
        intervene(lm.model, lm.tokenizer, saes, ids, edits)

    forward(), rerun()  # warm-up
    t_fwd, t_iv = [], []
    for _ in range(args.rounds):  # interleaved, so load on a shared machine hits both alike
        for fn, out in ((forward, t_fwd), (rerun, t_iv)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    f, i = statistics.median(t_fwd), statistics.median(t_iv)
    t0 = time.perf_counter()
    steer(lm.model, lm.tokenizer, saes, ids, [Edit(first, 7, 8.0)], new_tokens=20)
    t_steer = time.perf_counter() - t0
    print(f"SmolLM2-135M, {args.tokens} tokens, {len(saes)} SAEs x {args.latents} latents, torch threads "
          f"{torch.get_num_threads()}")
    print(f"bare forward          {f * 1000:8.1f} ms (median of {args.rounds})")
    print(f"intervention re-run   {i * 1000:8.1f} ms (clean + edited pass, downstream SAEs)  = {i / f:.2f} x forward")
    print(f"steering, 20 tokens   {t_steer * 1000:8.1f} ms (clean and steered greedy continuations)")


if __name__ == "__main__":
    main()
