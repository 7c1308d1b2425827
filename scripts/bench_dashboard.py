"""Benchmark of the analysis pass and the dashboard's feature page, measured side by side in one run.

1. A random-weight TopK SAE (16k latents by default) and N synthetic tokens (1M by default) in memory: every
   block is encoded alone (pure encode) and then analysed (stats, histograms, top-k with windows, quantile
   samples; neighbours at the end), interleaved so both see the same load. Prints analysis / encode (<= 2).
2. The index is written to a throwaway run directory and the Features page is rendered with Streamlit's
   AppTest: first feature cold, then other features warm (target < 300 ms).
3. The SAE is copied into a per-layer bank of --saes SAEs joined by matches/<j> groups (random candidates and
   causal effects in the shared schema), and the Flow page (node cap changed between renders) and a feature
   page with its lineage panel are rendered the same way (target < 300 ms warm).

3. (--causal) The causal check of matches (sae/analysis/causal.py) against the analysis pass, side by side:
   a random-weight Llama of SmolLM2-135M's block shape (d=576, MLP 1536, 9 heads / 3 KV heads), a per-layer
   bank of 6 TopK SAEs (2,304 latents, k=32) on resid.0-5, 16k tokens in contexts of 256. Timed: the analysis
   pass over the bank (stats, bank correlations), the causal scoring of the 5 adjacent pairs through the
   model's blocks (analyze's defaults: --causal-tokens, --causal-rounds), and SAE Match. Prints the ratios
   (target: causal / pass <= 2).

    python scripts/bench_dashboard.py                       # 16k latents x 1M tokens, d=576
    python scripts/bench_dashboard.py --tokens 200000       # quicker
    python scripts/bench_dashboard.py --causal              # causal matching cost vs the analysis pass
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations import layout  # noqa: E402
from activations.model import resolve_device  # noqa: E402
from sae.analysis.index_file import write_index  # noqa: E402
from sae.analysis.indexer import IndexerSettings  # noqa: E402
from sae.analysis.source import array_blocks  # noqa: E402
from sae.analysis.stream import index_saes, slots_of  # noqa: E402
from sae.config import SAEConfig  # noqa: E402
from sae.models import build_sae  # noqa: E402


def synthetic_tokens(n_tokens: int, d: int, n_dirs: int, seed: int = 0):
    """Activations with structure (sparse sums of random directions, like real residuals) + token ids."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=g)
    acts = torch.empty(n_tokens, d)
    for s in range(0, n_tokens, 65536):
        e = min(n_tokens, s + 65536)
        idx = torch.randint(0, n_dirs, (e - s, 8), generator=g)
        w = torch.rand(e - s, 8, generator=g) * 3
        acts[s:e] = (dirs[idx] * w.unsqueeze(2)).sum(1) + 0.3 * torch.randn(e - s, d, generator=g)
    token_ids = torch.randint(0, 50000, (n_tokens,), generator=g)
    doc_ids = torch.arange(n_tokens) // 300
    context_ids = torch.arange(n_tokens) // 256
    return acts, token_ids, doc_ids, context_ids


def time_encode(sae, blocks) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in blocks:
            sae.encode(b.acts["resid.0"])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def write_bench_run(root: Path, res: dict, sae, n_tokens: int, d: int) -> None:
    info = {"cfg": sae.cfg.to_dict(), "n_latents": sae.cfg.n_latents, "mode": sae.cfg.mode, "slots": slots_of(sae),
            "vectors": int(res["saes"]["resid.0"]["vectors"]), "match_next": None}
    meta = {"train_name": "bench", "tokens": n_tokens, "data": "all", "shards": [], "notes": [], "explainer": "none"}
    write_index(layout.index_path(root, "bench"), meta, res["saes"], {"resid.0": info}, [], [],
                [f"t{i}" for i in range(50000)])
    man = {"model": {"id": "synthetic", "n_layers": 1, "d_model": d}, "keys": ["resid.0"], "n_tokens": n_tokens,
           "shards": [], "context_length": 256}
    layout.manifest_path(root).write_text(json.dumps(man))
    layout.checkpoint_dir(root, "bench").mkdir(parents=True, exist_ok=True)


def add_bank_with_matches(root: Path, n_saes: int, m: int = 8, seed: int = 0) -> None:
    """Copy resid.0 into resid.1 .. resid.<n_saes-1> and join adjacent ones with matches/<j> groups: m random
    decoder-cosine candidates per feature, random causal effects, the best above 0.2 kept (as analyze does)."""
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(layout.index_path(root, "bench"), "r+") as f:
        info = json.loads(f["saes/resid.0"].attrs["info"])
        n = int(info["n_latents"])
        for s in range(1, n_saes):
            f.copy("saes/resid.0", f"saes/resid.{s}")
            cfg = {**info["cfg"], "in_keys": [f"resid.{s}"], "out_keys": [f"resid.{s}"]}
            f[f"saes/resid.{s}"].attrs["info"] = json.dumps({**info, "cfg": cfg})
        for j in range(n_saes - 1):
            cand = rng.integers(0, n, (n, m)).astype(np.int32)
            cos = np.sort(rng.uniform(0.1, 0.9, (n, m)), 1)[:, ::-1].astype(np.float32)
            corr = (cos * rng.uniform(0.2, 1.0, (n, m))).astype(np.float32)
            effect = (corr * rng.uniform(0.2, 1.0, (n, m))).astype(np.float32)
            col = effect.argmax(1)
            rows = np.arange(n)
            best = np.where(effect[rows, col] > 0.2, cand[rows, col], -1).astype(np.int32)
            g = f.create_group(f"matches/{j}")
            g.attrs.update({"up": f"resid.{j}", "down": f"resid.{j + 1}", "up_key": f"resid.{j}",
                            "down_key": f"resid.{j + 1}", "kind": "bank",
                            "methods": json.dumps(["cosine", "correlation", "causal", "saematch"])})
            agree = ((cand[:, 0] == best) * 1 + (cand[rows, corr.argmax(1)] == best) * 2 + 4) * (best >= 0)
            for name, arr in {"cand_idx": cand, "cand_cos": cos, "cand_corr": corr, "cand_effect": effect,
                              "best_idx": best, "best_effect": effect[rows, col], "best_corr": corr[rows, col],
                              "best_cos": cos[rows, col], "saematch_idx": cand[:, 0],
                              "saematch_score": cos[:, 0], "agree": agree.astype(np.uint8)}.items():
                g.create_dataset(name, data=arr)


def time_page(root: Path, query: dict, changes: list) -> tuple[float, list[float], object]:
    """AppTest render of the page `query` opens: cold, then once per change (a function of the AppTest that sets
    a widget), warm. Returns (cold s, [warm s], the AppTest)."""
    import os

    from streamlit.testing.v1 import AppTest

    os.environ["STRATA_RUN"] = str(root)
    app = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
    at = AppTest.from_file(app, default_timeout=120)
    at.query_params.update(query)
    t0 = time.perf_counter()
    at.run()
    cold = time.perf_counter() - t0
    assert not at.exception, at.exception
    warm = []
    for change in changes:
        change(at)
        t0 = time.perf_counter()
        at.run()
        warm.append(time.perf_counter() - t0)
        assert not at.exception, at.exception
    return cold, warm, at


def time_feature_page(root: Path, features: list[int]) -> tuple[float, list[float]]:
    cold, warm, at = time_page(root, {"page": "features", "train": "bench", "sae": "resid.0", "f": str(features[0])},
                               [lambda at, f=f: at.number_input(key="f-resid.0").set_value(f) for f in features[1:]])
    assert 'class="tok' in "".join(m.value for m in at.markdown)
    return cold, warm


def smollm2_shaped_llama(n_blocks: int, vocab: int = 2048):
    """A random-weight Llama with SmolLM2-135M's block shape (what one block between two SAEs costs)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=n_blocks,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
    return tf.LlamaForCausalLM(cfg).eval()


def bench_causal(args, device) -> None:
    from activations.hooks import capture
    from sae.analysis.analyze import AnalyzeConfig
    from sae.analysis.causal import ModelSpan, causal_effects, choose_contexts
    from sae.analysis.saematch import sae_match

    defaults = AnalyzeConfig()
    n_saes, T, n_tokens, d = 6, 256, args.causal_tokens, 576
    model = smollm2_shaped_llama(n_saes - 1).to(device)
    keys = [f"resid.{i}" for i in range(n_saes)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2048, (n_tokens // T, T), generator=g).to(device)
    with torch.no_grad():
        acts = {k: torch.cat([capture(model, keys, ids[s:s + 8])[k] for s in range(0, len(ids), 8)]) for k in keys}
    saes = {}
    for k in keys:
        cfg = SAEConfig(arch="topk", d_in=d, d_out=d, n_latents=args.causal_latents, k=args.k, in_keys=[k],
                        out_keys=[k], in_scales=[1 / float(acts[k].norm(dim=-1).mean()) * d ** 0.5],
                        out_scales=[1 / float(acts[k].norm(dim=-1).mean()) * d ** 0.5])
        saes[k] = build_sae(cfg).to(device).eval()
    flat = {k: v.reshape(-1, d) for k, v in acts.items()}
    tok = ids.reshape(-1).cpu()
    settings = IndexerSettings()
    print(f"\ncausal matching: {n_tokens:,} tokens (contexts of {T}), bank of {n_saes} TopK SAEs x "
          f"{args.causal_latents:,} latents (k={args.k}) on a random Llama with SmolLM2-135M blocks; "
          f"--causal-tokens {defaults.causal_tokens}, --causal-rounds {defaults.causal_rounds}; "
          f"threads {torch.get_num_threads()}; timings on a shared machine: compare the ratios")

    def analysis_pass():
        blocks = array_blocks(flat, tok, torch.arange(len(tok)) // 300, torch.arange(len(tok)) // T, 1024,
                              settings.window, device)
        return index_saes(saes, blocks, settings, device)

    def causal(res):
        t0 = time.perf_counter()
        for m in res["matches"]:
            up, down = saes[m["up"]], saes[m["down"]]
            span = ModelSpan(model, m["up_key"], m["down_key"])
            fired = torch.cat([res["saes"][m["up"]]["top_row"], res["saes"][m["up"]]["sample_row"]], 1)
            ctx = torch.tensor(choose_contexts(list(range(0, n_tokens - T + 1, T)), fired, T,
                                               defaults.causal_tokens // T)) // T
            batches = ((ids[ctx[s:s + 4]], {m["up_key"]: acts[m["up_key"]][ctx[s:s + 4]]})
                       for s in range(0, len(ctx), 4))
            effect, _ = causal_effects(up, down, span, batches, m["cand_idx"].to(device), defaults.causal_rounds)
            m["effect"] = effect
        return time.perf_counter() - t0

    def saematch(res):
        t0 = time.perf_counter()
        for m in res["matches"]:
            sae_match(saes[m["up"]], saes[m["down"]])
        return time.perf_counter() - t0

    t_pass, t_causal, t_match = [], [], []
    for _ in range(args.repeats):  # alternated, so both see the same machine load
        res = analysis_pass()
        t_pass.append(res["seconds"])
        t_causal.append(causal(res))
        t_match.append(saematch(res))
    measured = [float(torch.isfinite(m["effect"]).all(1).float().mean()) for m in res["matches"]]
    tp, tc, tm = np.median(t_pass), np.median(t_causal), np.median(t_match)
    print(f"analysis pass (6 SAEs)  {tp:8.1f} s")
    print(f"causal scoring (5 pairs) {tc:7.1f} s   upstream features ablated at least once: {np.mean(measured):.0%}")
    print(f"SAE Match (5 pairs)     {tm:8.1f} s")
    print(f"ratio causal/pass       {tc / tp:8.2f}    (target <= 2); with SAE Match {(tc + tm) / tp:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--latents", type=int, default=16384)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--device", default="auto")
    p.add_argument("--saes", type=int, default=4, help="SAEs of the bank the Flow page and lineage are timed on")
    p.add_argument("--causal", action="store_true", help="only the causal-matching comparison (item 3)")
    p.add_argument("--causal-tokens", type=int, default=16384)
    p.add_argument("--causal-latents", type=int, default=2304)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.causal:
        return bench_causal(args, device)

    cfg = SAEConfig(arch="topk", d_in=args.d, d_out=args.d, n_latents=args.latents, k=args.k, in_keys=["resid.0"],
                    out_keys=["resid.0"], in_scales=[1.0], out_scales=[1.0])
    sae = build_sae(cfg).to(device).eval()
    acts, tok, doc, ctx = synthetic_tokens(args.tokens, args.d, 4 * args.latents)
    settings = IndexerSettings()
    def blocks():
        return array_blocks({"resid.0": acts}, tok, doc, ctx, args.batch, settings.window, device)
    print(f"device {device}; {args.tokens:,} tokens x d={args.d}; TopK {args.latents:,} latents, k={args.k}; "
          f"batch {args.batch}; threads {torch.get_num_threads()}")

    time_encode(sae, array_blocks({"resid.0": acts[:args.batch * 2]}, tok, doc, ctx, args.batch, 5, device))  # warm-up
    # side by side, block by block: each block is first encoded alone (timed), then handed to the analysis
    # pass, so both timings see the same data and the same machine load; the encode-alone time is
    # subtracted from the pass's wall time
    encode_alone = [0.0]

    def interleaved():
        for b in blocks():
            encode_alone[0] += time_encode(sae, [b])
            yield b

    res = index_saes({"resid.0": sae}, interleaved(), settings, device)
    t_encode, t_pass = encode_alone[0], res["seconds"] - encode_alone[0]
    print(f"pure encode           {t_encode:8.1f} s   ({args.tokens / t_encode:,.0f} tokens/s)")
    print(f"analysis pass         {t_pass:8.1f} s   ({args.tokens / t_pass:,.0f} tokens/s; stats, histograms, "
          f"top-k + windows, quantile samples, neighbours)")
    print(f"ratio analysis/encode {t_pass / t_encode:8.2f}    (target <= 2)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        root.mkdir()
        t0 = time.perf_counter()
        write_bench_run(root, res, sae, args.tokens, args.d)
        size = layout.index_path(root, "bench").stat().st_size
        print(f"index write           {time.perf_counter() - t0:8.1f} s   ({size / 2**20:.0f} MiB)")
        rng = np.random.default_rng(0)
        feats = [int(x) for x in rng.choice(args.latents, 8, replace=False)]
        cold, warm = time_feature_page(root, feats)
        print(f"feature page cold     {cold * 1000:8.0f} ms")
        print(f"feature page warm     {np.median(warm) * 1000:8.0f} ms median of {len(warm)} "
              f"(max {max(warm) * 1000:.0f} ms; target < 300 ms)")

        import shutil

        root = shutil.copytree(root, Path(tmp) / "bank")  # a new index file: the app holds the first one open
        add_bank_with_matches(root, args.saes)
        print(f"bank of {args.saes} SAEs, {args.saes - 1} matched pairs")
        caps = [50, 70, 40, 80, 60, 30, 90]
        cold, warm, at = time_page(root, {"page": "flow", "train": "bench"},
                                   [lambda at, c=c: at.slider(key="flow_nodes").set_value(c) for c in caps])
        spec = next(c.proto.spec for c in at.get("plotly_chart") if '"sankey"' in c.proto.spec)
        assert json.loads(spec)["data"][0]["type"] == "sankey"
        print(f"flow page cold        {cold * 1000:8.0f} ms")
        print(f"flow page warm        {np.median(warm) * 1000:8.0f} ms median of {len(warm)} "
              f"(max {max(warm) * 1000:.0f} ms; node cap 30-90; target < 300 ms)")
        mid = f"resid.{args.saes // 2}"
        cold, warm, at = time_page(root, {"page": "features", "train": "bench", "sae": mid, "f": str(feats[0])},
                                   [lambda at, f=f: at.number_input(key=f"f-{mid}").set_value(f) for f in feats[1:]])
        assert "**Lineage**" in "".join(m.value for m in at.markdown)
        print(f"feature+lineage cold  {cold * 1000:8.0f} ms")
        print(f"feature+lineage warm  {np.median(warm) * 1000:8.0f} ms median of {len(warm)} "
              f"(max {max(warm) * 1000:.0f} ms; target < 300 ms)")


if __name__ == "__main__":
    main()
