"""Benchmark of `strata graph`: one attribution graph for a 64-token prompt on SmolLM2-135M with transcoders at
all 30 layers (targets: <= 2 minutes and <= 4 GiB peak memory on a 2-core machine).

1. Unless --run is given, a small harvest of mlp_in/mlp_out at every layer (64-token contexts) and TopK
   transcoders trained on it briefly (the timing depends on how many features fire, k per position, not on how
   well they are trained), in --work (reused when present).
2. `strata graph` runs in a child process; its wall time and peak RSS (getrusage of the child) are printed with the
   nodes/edges before and after pruning and the share of logit influence the pruned graph keeps.

    python scripts/bench_graph.py                              # harvest + train once, then the graph
    python scripts/bench_graph.py --max-feature-nodes 1024     # a smaller feature budget
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

TRAIN = "tc-all"


def prepare(work: Path, tokens: int, k: int, expansion: int) -> Path:
    run = work / "smol"
    if not (run / "manifest.json").is_file():
        assert main(["harvest", str(run), "--sites", "mlp_in,mlp_out", "--layers", "all", "--context", "64",
                     "--max-tokens", str(tokens), "--shard-tokens", "4096", "--progress", "false"]) == 0
    if not layout.checkpoint_dir(run, TRAIN).is_dir():
        assert main(["train", str(run), "--mode", "transcoder", "--arch", "topk", "--k", str(k), "--expansion",
                     str(expansion), "--batch-size", "1024", "--name", TRAIN, "--heldout-fraction", "0",
                     "--progress", "false"]) == 0
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
    ap.add_argument("--run", default="", help="an existing run with transcoders (skips harvest and training)")
    ap.add_argument("--name", default=TRAIN)
    ap.add_argument("--tokens", type=int, default=8192, help="harvest tokens for the quick transcoders")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-feature-nodes", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    run = Path(args.run) if args.run else prepare(Path(args.work), args.tokens, args.k, args.expansion)
    prompt = prompt_of(args.prompt_tokens)
    cmd = [sys.executable, "-m", "strata.cli", "graph", str(run), "--name", args.name, "--prompt", prompt,
           "--graph-name", "bench", "--overwrite", "true", "--max-feature-nodes", str(args.max_feature_nodes),
           "--batch-size", str(args.batch_size)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_gib, cpu = usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime
    doc = json.loads(layout.graph_path(run, args.name, "bench").read_text())
    m = doc["metadata"]
    print("machine: shared 2-core CPU (other jobs running; figures are noisy)")
    print(f"prompt tokens           {len(m['prompt_ids'])}")
    print(f"layers with transcoders {len(m['saes'])} (uncovered: {[u['layer'] for u in m['uncovered_layers']]})")
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
