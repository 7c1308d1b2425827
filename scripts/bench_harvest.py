"""Harvest and reader throughput, measured side by side in one run (this machine is noisy: compare ratios).

Prints:
  1. harvest tokens/s / bare forward tokens/s to the same depth, in fp32 and in bf16  (target >= 0.9), and the
     harvest with `--precision auto` (what the probe picks here) / the fp32 harvest    (target >= 1.8 where bf16
     units are fast)
  2. early-exit speed-up: full-depth forward time / half-depth forward time
  3. shuffled reader throughput / raw sequential read of the same bytes  (target >= 0.8)
  4. peak RSS of a harvest for two corpus sizes                          (must not grow with the corpus)
  5. the cost of never reading damaged data: shuffled reader over shards whose chunks it checks against their
     xxh3 hashes / the same reader over the same rows unchecked            (target >= 0.9), and the same for
     HDF5's fletcher32 filter (the alternative), and for shards written without checksums (older runs: sha256
     of the whole file on first open)

Usage: python scripts/bench_harvest.py [--model smollm2-135m] [--tokens 4096] [--only 1,2,3,4,5] [--device cuda]
       [--threads N] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from activations.config import HarvestConfig  # noqa: E402
from activations.corpus import builtin_documents  # noqa: E402
from activations.harvest import harvest  # noqa: E402
from activations.hooks import capture  # noqa: E402
from activations.manifest import file_sha256, load_manifest, save_manifest  # noqa: E402
from activations.model import forward_matmul_shapes, load_model  # noqa: E402
from activations.precision import bf16_supported, resolve  # noqa: E402
from activations.reader import ActivationReader, open_run  # noqa: E402
from activations.tokens import pack_contexts  # noqa: E402


def bare_forward_rate(lm, key: str, batches) -> float:
    t = time.perf_counter()
    n = 0
    for ids in batches:
        capture(lm.model, [key], ids)
        n += ids.numel()
    return n / (time.perf_counter() - t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def harvest_vs_forward(model: str, tokens: int, tmp: Path, device: str = "cpu", rounds: int = 2) -> dict:
    """Harvest in fp32 and in bf16, each beside a bare forward to the same depth in the same precision, and what
    `--precision auto` picks here. Interleaved rounds, best of each, so background load hits every method alike."""
    dev = torch.device(device)
    lms = {"fp32": load_model(model, dev, torch.float32)}
    auto = resolve("auto", dev, forward_matmul_shapes(lms["fp32"], 8 * 128))
    if bf16_supported(dev):
        lms["bf16"] = load_model(model, dev, torch.bfloat16)
    n = lms["fp32"].info["n_layers"]
    ctx, bc = 128, 8
    contexts = pack_contexts(builtin_documents(), lms["fp32"].tokenizer, ctx)
    ids = torch.from_numpy(np.stack([next(contexts).token_ids for _ in range(tokens // ctx)])).long().to(dev)
    batches = list(ids.split(bc))
    rates = {}
    for name, lm in lms.items():
        bare_forward_rate(lm, "resid.1", batches[:1])  # warm-up
        rates[name] = {"harvest": 0.0, "full": 0.0, "half": 0.0}
    for round_ in range(rounds):
        for name, lm in lms.items():
            # a fresh folder each time (deleting the last round's run is no part of a harvest), removed untimed
            run_dir = tmp / f"h-{name}-{round_}"
            cfg = HarvestConfig(run_dir=str(run_dir), model=model, sites="resid", layers="all", context=ctx,
                                batch_contexts=bc, max_tokens=tokens, shard_tokens=4096, progress=False, device=device)
            r = rates[name]
            _sync(dev)
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                harvest(cfg, lm=lm)
            _sync(dev)
            r["harvest"] = max(r["harvest"], tokens / (time.perf_counter() - t))
            shutil.rmtree(run_dir)
            r["full"] = max(r["full"], bare_forward_rate(lm, f"resid.{n}", batches))
            if name == "fp32":
                r["half"] = max(r["half"], bare_forward_rate(lm, f"resid.{n // 2}", batches))
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"[1] {model} on {where}, all {n + 1} resid keys, {tokens:,} tokens; harvest vs a bare forward to the "
          f"same depth in the same precision (target >= 0.9):")
    for name, r in rates.items():
        print(f"    {name}: harvest {r['harvest']:,.0f} tok/s, bare forward {r['full']:,.0f} tok/s "
              f"-> ratio {r['harvest'] / r['full']:.2f}")
    chosen = rates[auto.name]["harvest"]
    print(f"    auto: {auto.name} ({auto.reason}) -> harvest {chosen:,.0f} tok/s = "
          f"{chosen / rates['fp32']['harvest']:.2f}x the fp32 harvest (target >= 1.8 where bf16 is fast)")
    full, half = rates["fp32"]["full"], rates["fp32"]["half"]
    print(f"[2] early exit at layer {n // 2} of {n} (fp32): {half:,.0f} tok/s vs {full:,.0f} tok/s "
          f"-> speed-up {half / full:.2f}x")
    return {name: dict(r) for name, r in rates.items()} | {"auto": auto.name}


def tiny_wide_model(folder: Path, d: int = 576) -> Path:
    """A random 2-layer Llama with d=576 (SmolLM2's width), to write many shards fast."""
    import transformers as tf

    tok = load_model("smollm2-135m").tokenizer
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=4 * d // 2, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def reader_vs_raw(run_dir: Path, rounds: int = 2) -> None:
    """Best of interleaved rounds, after os.sync(): a run read back while the kernel is still writing it out
    measures the disk's write-back, not the reader."""
    os.sync()
    run = open_run(run_dir)
    key = run.keys[-1]
    nbytes = run.n_tokens * run.d(key) * 2
    raw = shuf = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for i in run.shard_ids:  # raw sequential read of the same bytes, converted to float32 like the reader
            run.to_float(run.read_block(key, i))
        raw = min(raw, time.perf_counter() - t)
        t = time.perf_counter()
        n = sum(len(b.rows) for b in ActivationReader(run, [key], 4096, shuffle=True, seed=0))
        shuf = min(shuf, time.perf_counter() - t)
        assert n == run.n_tokens
    print(f"[3] reader over {run.n_tokens:,} tokens x {run.d(key)} ({nbytes / 2**20:.0f} MiB): raw sequential "
          f"{nbytes / raw / 2**20:,.0f} MiB/s, shuffled batches {nbytes / shuf / 2**20:,.0f} MiB/s "
          f"-> ratio {raw / shuf:.2f} (target >= 0.8)")


def rewritten(run_dir: Path, dest: Path, fletcher32: bool) -> Path:
    """A copy of a run whose activation shards hold only the rows: as older harvests wrote them (no checksums),
    or with HDF5's fletcher32 filter instead of chunk hashes."""
    import h5py

    shutil.copytree(run_dir, dest)
    m = load_manifest(dest)
    for s in m.shards:
        for key in m.keys:
            path = dest / s.files[key]["path"]
            with h5py.File(path, "r") as f:
                data, chunks, attrs = f["acts"][:], f["acts"].chunks, dict(f["acts"].attrs)
            with h5py.File(path, "w", libver="latest") as f:
                f.create_dataset("acts", data=data, chunks=chunks, maxshape=(None, data.shape[1]), track_times=False,
                                 fletcher32=fletcher32)
                f["acts"].attrs.update(attrs)
            s.files[key]["sha256"] = file_sha256(path)
    save_manifest(dest, m)
    return dest


def checksum_cost(run_dir: Path, tmp: Path, rounds: int = 4) -> None:
    """Best of interleaved rounds of one shuffled epoch: checked vs the same rows unchecked."""
    plain = rewritten(run_dir, tmp / "plain", fletcher32=False)
    f32 = rewritten(run_dir, tmp / "f32", fletcher32=True)
    os.sync()
    ways = {"xxh3": lambda: open_run(run_dir), "unchecked": lambda: open_run(plain, check_unfiltered=False),
            "fletcher32": lambda: open_run(f32, check_unfiltered=False), "sha256 on open": lambda: open_run(plain)}
    best = dict.fromkeys(ways, float("inf"))
    names = list(ways)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each way takes each place in the order
            run = ways[name]()
            t = time.perf_counter()
            n = sum(len(b.rows) for b in ActivationReader(run, [run.keys[-1]], 4096, shuffle=True, seed=0))
            best[name] = min(best[name], time.perf_counter() - t)
            assert n == run.n_tokens
            run.close()
    run = open_run(run_dir)
    mib = run.n_tokens * run.d(run.keys[-1]) * 2 / 2**20
    rate = {k: mib / v for k, v in best.items()}
    ratio = {k: v / rate["unchecked"] for k, v in rate.items()}
    print(f"[5] never reading damaged data, shuffled reader over {mib:.0f} MiB: chunk hashes checked {rate['xxh3']:,.0f} MiB/s, "
          f"unchecked {rate['unchecked']:,.0f} MiB/s -> ratio {ratio['xxh3']:.2f} (target >= 0.9); fletcher32 instead "
          f"{rate['fletcher32']:,.0f} MiB/s -> {ratio['fletcher32']:.2f}; older shards, sha256 on first open "
          f"{rate['sha256 on open']:,.0f} MiB/s -> {ratio['sha256 on open']:.2f}")


def peak_rss(model_dir: Path, tokens: int, tmp: Path) -> float:
    code = (f"import resource,sys; sys.path.insert(0, {str(ROOT)!r});"
            "from activations.config import HarvestConfig; from activations.harvest import harvest;"
            f"harvest(HarvestConfig(run_dir={str(tmp / f'm{tokens}')!r}, model={str(model_dir)!r}, max_tokens={tokens}, progress=False));"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reader-tokens", type=int, default=262144)
    ap.add_argument("--only", default="1,2,3,4,5", help="comma list of the measurements to run")
    ap.add_argument("--device", default="cpu", help="device of the harvest measurements [1-2]: cpu, cuda")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the reference machine has 2 cores)")
    ap.add_argument("--json", default="", help="also write measurements [1-2] to this JSON file")
    args = ap.parse_args()
    only = {int(x) for x in args.only.split(",")}
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if only & {1, 2}:
            rates = harvest_vs_forward(args.model, args.tokens, tmp, args.device)
            if args.json:
                Path(args.json).write_text(json.dumps(rates, indent=1))
        wide = tiny_wide_model(tmp / "wide")
        if only & {3, 5}:
            harvest(HarvestConfig(run_dir=str(tmp / "r"), model=str(wide), layers="2", max_tokens=args.reader_tokens,
                                  shard_tokens=65536, batch_contexts=32, progress=False))
        if 3 in only:
            reader_vs_raw(tmp / "r")
        if 4 in only:
            small, big = args.reader_tokens // 8, args.reader_tokens // 2
            a, b = peak_rss(wide, small, tmp), peak_rss(wide, big, tmp)
            print(f"[4] peak RSS: {small:,} tokens {a:,.0f} MiB, {big:,} tokens {b:,.0f} MiB -> ratio {b / a:.2f} (bounded if ~1.0)")
        if 5 in only:
            checksum_cost(tmp / "r", tmp)


if __name__ == "__main__":
    main()
