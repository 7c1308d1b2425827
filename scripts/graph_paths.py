"""Read an attribution graph as text: its output logits, where the chosen logit's influence comes from (token
embeddings vs error nodes), its most influential nodes, and its strongest paths from the prompt's tokens to it.

    python scripts/graph_paths.py RUN/graphs/<train name>/<graph name>.json
    python scripts/graph_paths.py GRAPH.json --logit 1 --paths 8 --nodes 15

Everything is measured inside the pruned graph the file holds, with the normalisation the pruning uses: each
node's incoming |weights| scaled to sum 1. A path's share is the product of those normalised weights along it:
the part of the logit's input the path accounts for (the shares of all paths from the logit to the graph's roots
sum to 1). A node's share is the sum over the paths through it. Roots are token embeddings, error nodes (MLP
output the transcoder does not reconstruct) and features whose inputs were pruned away.
"""
from __future__ import annotations

import argparse
import heapq
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae.circuits.graph_file import read_graph  # noqa: E402

FEATURES = ("transcoder", "cross layer transcoder")


def describe(node: dict, tokens: list[str]) -> str:
    pos = node["ctx_idx"]
    at = f"@{pos} {tokens[pos]!r}" if pos < len(tokens) else f"@{pos}"
    kind = node["feature_type"]
    if kind == "embedding":
        return f"token {at}"
    if kind == "logit":
        return node["clerp"] or f"logit {node['feature']}"
    if kind == "mlp reconstruction error":
        return f"error L{node['layer']} {at}"
    label = f" \"{node['clerp'][:70]}\"" if node["clerp"] else ""
    return f"L{node['layer']} #{node['feature']} {at} act {node['activation']:.2f}{label}"


def layer_rank(node: dict) -> int:
    return -1 if node["feature_type"] == "embedding" else int(node["layer"])


class Reader:
    """The pruned graph with each node's inputs normalised: inputs[target] = [(source, signed weight, share)]."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.nodes = {n["node_id"]: n for n in doc["nodes"]}
        self.tokens = doc["metadata"].get("prompt_tokens", [])
        self.inputs = defaultdict(list)
        for link in doc["links"]:
            self.inputs[link["target"]].append((link["source"], float(link["weight"])))
        for t, ins in self.inputs.items():
            total = sum(abs(w) for _, w in ins) or 1.0
            self.inputs[t] = sorted(((s, w, abs(w) / total) for s, w in ins), key=lambda e: -e[2])

    def logits(self) -> list[dict]:
        return sorted((n for n in self.doc["nodes"] if n["feature_type"] == "logit"), key=lambda n: -n["token_prob"])

    def shares(self, target: str) -> dict:
        """{node_id: share of target's input that flows through it} (target itself 1)."""
        mass = defaultdict(float)
        mass[target] = 1.0
        for nid in sorted(self.nodes, key=lambda i: -layer_rank(self.nodes[i])):
            m = mass.get(nid, 0.0)
            if m:
                for src, _, share in self.inputs.get(nid, []):
                    mass[src] += m * share
        return dict(mass)

    def top_paths(self, target: str, k: int, max_pops: int = 200_000) -> list[tuple[float, list]]:
        """The k paths from a root to target with the largest share, best first (best-first search backwards:
        extending a path never raises its share, so paths complete in order)."""
        heap, done, pops = [(-1.0, [(target, None)])], [], 0
        while heap and len(done) < k and pops < max_pops:
            neg, path = heapq.heappop(heap)
            pops += 1
            ins = self.inputs.get(path[-1][0], [])
            if not ins:
                done.append((-neg, path[::-1]))
                continue
            for src, w, share in ins:
                heapq.heappush(heap, (neg * share, [*path, (src, w)]))
        return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("graph", help="a graph JSON written by `strata graph` (RUN/graphs/<name>/<graph>.json)")
    ap.add_argument("--logit", type=int, default=0, help="which output logit, by rank of probability (0 = top)")
    ap.add_argument("--paths", type=int, default=5, help="strongest paths to print")
    ap.add_argument("--nodes", type=int, default=10, help="most influential feature nodes to print")
    args = ap.parse_args()
    g = Reader(read_graph(args.graph))
    meta = g.doc["metadata"]
    print(f"prompt: {''.join(g.tokens)!r} ({len(g.tokens)} tokens)   train: {meta.get('train', '?')}")
    print(f"pruned graph: {len(g.nodes)} nodes, {len(g.doc['links'])} edges (before: {meta.get('n_nodes_before')} "
          f"nodes, {meta.get('n_edges_before')} edges); influence kept {meta.get('influence_kept', 0):.3f}, "
          f"replacement {meta.get('replacement_score', 0):.3f}, completeness {meta.get('completeness_score', 0):.3f}")
    logits = g.logits()
    print("outputs: " + ", ".join(n["clerp"] for n in logits))
    if not 0 <= args.logit < len(logits):
        sys.exit(f"graph_paths: error: --logit {args.logit} is out of range; the graph has {len(logits)} logits")
    target = logits[args.logit]["node_id"]
    shares = g.shares(target)
    roots = defaultdict(float)
    for nid, s in shares.items():
        if nid != target and not g.inputs.get(nid):
            roots[g.nodes[nid]["feature_type"]] += s
    print(f"\nwhere {logits[args.logit]['clerp']} comes from (shares of its input in the pruned graph): "
          + ", ".join(f"{kind} {s:.3f}" for kind, s in sorted(roots.items(), key=lambda e: -e[1])))
    per_layer = defaultdict(float)
    for nid, s in shares.items():
        if g.nodes[nid]["feature_type"] in FEATURES:
            per_layer[int(g.nodes[nid]["layer"])] += s
    print("share through features, by layer: " + " ".join(f"L{L}:{s:.2f}" for L, s in sorted(per_layer.items())))
    feats = sorted((nid for nid in shares if g.nodes[nid]["feature_type"] in FEATURES),
                   key=lambda i: -shares[i])
    print(f"\ntop {min(args.nodes, len(feats))} feature nodes by share:")
    for nid in feats[:args.nodes]:
        print(f"  {shares[nid]:.3f}  {describe(g.nodes[nid], g.tokens)}")
    print(f"\ntop {args.paths} paths (share = product of normalised edge weights; signed weights in brackets):")
    for share, path in g.top_paths(target, args.paths):
        hops = [describe(g.nodes[path[0][0]], g.tokens)]
        for (nid, _), (_, w) in zip(path[1:], path[:-1]):
            hops.append(f"[{w:+.3g}] -> {describe(g.nodes[nid], g.tokens)}")
        print(f"  {share:.3f}  " + "\n         ".join(hops))


if __name__ == "__main__":
    main()
