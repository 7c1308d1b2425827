"""Benchmark of `strata graph`: one attribution graph for a 64-token prompt on SmolLM2-135M with transcoders at
all 30 layers (targets: <= 2 minutes and <= 4 GiB peak memory on a 2-core machine), and a graph worth reading.

1. Unless --run is given, in --work (each stage reused when present): a harvest of mlp_in/mlp_out at every layer
   (64-token contexts; 128k tokens = 8.8 GB of fp16 shards), skip transcoders trained on it (TopK with a learned
   linear skip x @ W_skip, as circuit-tracer's transcoders have: it carries the MLP's linear part, which lowers the
   error nodes' share a lot), `strata eval` (held-out FVU per layer, CE recovered with every MLP replaced) and
   `strata analyze` (offline token explanations, so graph nodes have labels). The defaults take about 20-30
   minutes of CPU on a busy 2-core machine; --tokens 8192 --epochs 1 --skip false is the quick timing-only setup
   (the time depends on how many features fire, k per position, not on how well they are trained).
2. `strata graph` runs in a child process on the 64-token prompt; its wall time and peak RSS (getrusage of the
   child) are printed with the nodes/edges before and after pruning and the share of logit influence the pruned
   graph keeps, beside the held-out FVU per layer and the graph's replacement and completeness scores.
   With --mode clt, a TopK cross-layer transcoder over --clt-layers instead (no skip; its decoders grow with the
   (source, target) layer pairs: 30 layers at expansion 8 would be 1.2 billion decoder weights, so --clt-expansion
   defaults to 1, 576 latents per layer, 154 million decoder weights over 465 pairs).
3. A second graph on --prompt (short, with a confident next token: SmolLM2 gives ' writing' p=0.89), pruned
   harder (--read-thresholds) so the Circuits page can show it, and its strongest paths (scripts/graph_paths.py).

    python scripts/bench_graph.py                                          # everything, once
    python scripts/bench_graph.py --tokens 8192 --epochs 1 --skip false    # quick: timing only
    python scripts/bench_graph.py --max-feature-nodes 1024                 # a smaller feature budget
    python scripts/bench_graph.py --mode clt --tokens 8192 --epochs 1      # a CLT over all 30 layers, quick
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

TRAIN = {"transcoder": "tc-skip", "clt": "clt-all"}
ROOT = Path(__file__).resolve().parents[1]
READABLE = "To open a file for reading, call open(path, 'r'). To open it for"


def prepare(work: Path, args) -> Path:
    run = work / "smol"
    if not (run / "manifest.json").is_file():
        assert main(["harvest", str(run), "--sites", "mlp_in,mlp_out", "--layers", "all", "--context", "64",
                     "--max-tokens", str(args.tokens), "--shard-tokens", "16384", "--progress", "false"]) == 0
    if not layout.checkpoint_dir(run, args.name).is_dir():
        if args.mode == "clt":
            shape = ["--expansion", str(args.clt_expansion)] + (
                ["--layers", args.clt_layers] if args.clt_layers != "all" else [])
        else:
            shape = ["--expansion", str(args.expansion), "--skip", str(args.skip).lower()]
        assert main(["train", str(run), "--mode", args.mode, "--arch", "topk", "--k", str(args.k), *shape,
                     "--batch-size", str(args.train_batch), "--epochs", str(args.epochs), "--lr", str(args.lr),
                     "--precision", args.precision, "--name", args.name, "--progress", "false"]) == 0
    if not (layout.train_dir(run, args.name) / "eval.json").is_file():
        assert main(["eval", str(run), "--name", args.name, "--ce-contexts", "16", "--precision", args.precision]) == 0
    if not layout.index_path(run, args.name).is_file():
        assert main(["analyze", str(run), "--name", args.name, "--data", "all", "--max-tokens",
                     str(args.analyze_tokens), "--causal-tokens", "0", "--saematch", "false",
                     "--explainer", "tokens"]) == 0
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


def graph(run: Path, args, prompt: str, graph_name: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "strata.cli", "graph", str(run), "--name", args.name, "--prompt", prompt,
           "--graph-name", graph_name, "--overwrite", "true", "--max-feature-nodes", str(args.max_feature_nodes),
           "--batch-size", str(args.batch_size), *extra]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(layout.graph_path(run, args.name, graph_name).read_text())


def by_layer(item: tuple[str, float]) -> tuple:
    """SAE ids in layer order (transcoder.2 before transcoder.10)."""
    stem, _, last = item[0].rpartition(".")
    return (stem, int(last)) if last.isdigit() else (item[0], -1)


def print_eval(run: Path, name: str) -> None:
    path = layout.train_dir(run, name) / "eval.json"
    if not path.is_file():
        print(f"(no {path}: run `strata eval {run} --name {name}` for the held-out FVU)")
        return
    saes = json.loads(path.read_text())["saes"]
    fvu = {sid: r["overall"]["fvu"] for sid, r in saes.items() if "fvu" in r["overall"]}  # a CLT: one entry
    print("held-out FVU            " + " ".join(f"{sid}:{v:.2f}" for sid, v in sorted(fvu.items(), key=by_layer)))
    print(f"held-out FVU mean       {sum(fvu.values()) / max(1, len(fvu)):.3f}")
    for r in saes.values():
        o = r["overall"]
        if "ce_loss_recovered_all_mlps" in o:
            print(f"every MLP replaced      CE recovered {o['ce_loss_recovered_all_mlps']:.3f}  KL recovered "
                  f"{o['kl_recovered_all_mlps']:.3f}")
            break


def main_bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/strata-bench-graph")
    ap.add_argument("--mode", choices=sorted(TRAIN), default="transcoder", help="what replaces the MLPs")
    ap.add_argument("--run", default="", help="an existing run with transcoders (skips harvest and training)")
    ap.add_argument("--name", default="", help="training run name (default tc-skip, or clt-all with --mode clt)")
    ap.add_argument("--tokens", type=int, default=131072, help="harvest tokens")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--clt-expansion", type=int, default=1, help="(--mode clt) latents per layer / d_model")
    ap.add_argument("--clt-layers", default="all", help="(--mode clt) the CLT's layers (e.g. 0-9)")
    ap.add_argument("--skip", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                    help="skip transcoders (a learned linear x @ W_skip beside the features): true/false")
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--train-batch", type=int, default=1024)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--analyze-tokens", type=int, default=49152, help="tokens `strata analyze` indexes")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--prompt", default=READABLE, help="the short prompt of the graph to read ('' = none)")
    ap.add_argument("--read-thresholds", default="0.5,0.8",
                    help="node,edge pruning thresholds of the graph to read: tighter than the 0.8,0.98 defaults "
                         "(~120k links on the 19-token prompt) so its paths can be read on one screen")
    ap.add_argument("--max-feature-nodes", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    args.name = args.name or TRAIN[args.mode]
    run = Path(args.run) if args.run else prepare(Path(args.work), args)
    t0 = time.perf_counter()
    doc = graph(run, args, prompt_of(args.prompt_tokens), "bench")
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # only the graph child so far
    peak_gib, cpu = usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime
    m = doc["metadata"]
    print("machine: shared 2-core CPU (other jobs running; figures are noisy)")
    print(f"prompt tokens           {len(m['prompt_ids'])}")
    print(f"mode                    {m['mode']} (k={args.k} per position and layer)")
    print(f"layers covered          {len(m['saes'])} (uncovered: {[u['layer'] for u in m['uncovered_layers']]})")
    print(f"active features         {m['n_active_features']} (rows computed for at most {m['max_feature_nodes']})")
    print(f"seconds (child, total)  {wall:.1f}   (inside the verb, model load included: {m['seconds']:.1f})")
    print(f"CPU seconds (user+sys)  {cpu:.1f}   (on an idle 2-core machine the wall time is about half of this)")
    print(f"peak RSS                {peak_gib:.2f} GiB")
    print(f"nodes before / after    {m['n_nodes_before']} / {len(doc['nodes'])}")
    print(f"edges before / after    {m['n_edges_before']} / {len(doc['links'])}")
    print(f"influence kept          {m['influence_kept']:.3f}")
    print(f"replacement score       {m['replacement_score']:.3f}")
    print(f"completeness score      {m['completeness_score']:.3f}")
    print_eval(run, args.name)
    if args.prompt:
        node_t, edge_t = args.read_thresholds.split(",")
        graph(run, args, args.prompt, "readable", "--node-threshold", node_t, "--edge-threshold", edge_t)
        print(f"\n--- the graph to read: {layout.graph_path(run, args.name, 'readable')}")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "graph_paths.py"),
                        str(layout.graph_path(run, args.name, "readable"))], check=True, cwd=ROOT)


if __name__ == "__main__":
    main_bench()
