"""Benchmark of `strata graph`: one attribution graph for a 64-token prompt on SmolLM2-135M with transcoders at
all 30 layers (targets: <= 2 minutes and <= 4 GiB peak memory on a 2-core machine), or (--mode clt) with a
cross-layer transcoder over --clt-layers.

1. Unless --run is given, a small harvest of mlp_in/mlp_out at every layer (64-token contexts) and TopK
   transcoders (or a TopK CLT) trained on it briefly (the timing depends on how many features fire, k per position
   and layer, not on how well they are trained), in --work (reused when present). A CLT's decoders grow with the
   (source, target) layer pairs: 30 layers at expansion 8 would be 1.2 billion decoder weights, so the CLT bench
   defaults to --clt-expansion 1 (576 latents per layer; 154 million decoder weights over 465 pairs).
2. `strata graph` runs in a child process; its wall time and peak RSS (getrusage of the child) are printed with the
   nodes/edges before and after pruning and the share of logit influence the pruned graph keeps.

    python scripts/bench_graph.py                              # harvest + train once, then the graph
    python scripts/bench_graph.py --max-feature-nodes 1024     # a smaller feature budget
    python scripts/bench_graph.py --mode clt                   # a CLT over all 30 layers
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations import layout  # noqa: E402
from strata.cli import main  # noqa: E402

TRAIN = {"transcoder": "tc-all", "clt": "clt-all"}


def prepare(work: Path, tokens: int, mode: str, k: int, expansion: int, clt_layers: str) -> Path:
    run = work / "smol"
    if not (run / "manifest.json").is_file():
        assert main(["harvest", str(run), "--sites", "mlp_in,mlp_out", "--layers", "all", "--context", "64",
                     "--max-tokens", str(tokens), "--shard-tokens", "4096", "--progress", "false"]) == 0
    if not layout.checkpoint_dir(run, TRAIN[mode]).is_dir():
        layers = ["--layers", clt_layers] if mode == "clt" and clt_layers != "all" else []
        assert main(["train", str(run), "--mode", mode, "--arch", "topk", "--k", str(k), "--expansion",
                     str(expansion), "--batch-size", "1024", "--name", TRAIN[mode], "--heldout-fraction", "0",
                     *layers, "--progress", "false"]) == 0
    return run


def prompt_of(n_tokens: int) -> str:
    """A prompt of exactly n_tokens SmolLM2 tokens (BOS included if the tokenizer adds one) from the corpus."""
    from activations.corpus import builtin_documents
    from activations.model import load_model

    tok = load_model("smollm2-135m", "cpu").tokenizer
    text = " ".join(itertools.islice(builtin_documents(), 3))
    words = text.split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest word prefix that fits
        mid = (lo + hi + 1) // 2
        if len(tok(" ".join(words[:mid])).input_ids) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def main_bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/strata-bench-graph")
    ap.add_argument("--mode", choices=sorted(TRAIN), default="transcoder", help="what replaces the MLPs")
    ap.add_argument("--run", default="", help="an existing run with transcoders (skips harvest and training)")
    ap.add_argument("--name", default="", help="training run name (default tc-all, or clt-all with --mode clt)")
    ap.add_argument("--tokens", type=int, default=8192, help="harvest tokens for the quick transcoders")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--clt-expansion", type=int, default=1, help="latents per layer / d_model of the CLT")
    ap.add_argument("--clt-layers", default="all", help="the CLT's layers (e.g. 0-9)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-feature-nodes", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    name = args.name or TRAIN[args.mode]
    expansion = args.clt_expansion if args.mode == "clt" else args.expansion
    t_prep = time.perf_counter()
    run = Path(args.run) if args.run else prepare(Path(args.work), args.tokens, args.mode, args.k, expansion,
                                                  args.clt_layers)
    t_prep = time.perf_counter() - t_prep
    prompt = prompt_of(args.prompt_tokens)
    cmd = [sys.executable, "-m", "strata.cli", "graph", str(run), "--name", name, "--prompt", prompt,
           "--graph-name", "bench", "--overwrite", "true", "--max-feature-nodes", str(args.max_feature_nodes),
           "--batch-size", str(args.batch_size)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_gib, cpu = usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime
    doc = json.loads(layout.graph_path(run, name, "bench").read_text())
    m = doc["metadata"]
    n_layers = len(m["saes"])
    print("machine: shared 2-core CPU (other jobs running; figures are noisy)")
    print(f"harvest + training      {t_prep:.1f} s (0 when reused from --work)")
    print(f"prompt tokens           {len(m['prompt_ids'])}")
    print(f"mode                    {m['mode']} (k={args.k} per position and layer, expansion {expansion})")
    print(f"layers covered          {n_layers} (uncovered: {[u['layer'] for u in m['uncovered_layers']]})")
    print(f"active features         {m['n_active_features']} (rows computed for at most {m['max_feature_nodes']})")
    print(f"seconds (child, total)  {wall:.1f}   (inside the verb, model load included: {m['seconds']:.1f})")
    print(f"CPU seconds (user+sys)  {cpu:.1f}   (on an idle 2-core machine the wall time is about half of this)")
    print(f"peak RSS                {peak_gib:.2f} GiB")
    print(f"nodes before / after    {m['n_nodes_before']} / {len(doc['nodes'])}")
    print(f"edges before / after    {m['n_edges_before']} / {len(doc['links'])}")
    print(f"influence kept          {m['influence_kept']:.3f}")
    print(f"replacement score       {m['replacement_score']:.3f}")
    print(f"completeness score      {m['completeness_score']:.3f}")


if __name__ == "__main__":
    main_bench()
