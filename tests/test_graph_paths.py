"""scripts/graph_paths.py as a researcher uses it on a graph file: where the top logit's influence comes from
(tokens vs error nodes), the most influential features, and the strongest paths with their shares."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sae.circuits.graph_file import node, write_graph

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "graph_paths.py"


@pytest.fixture
def small_graph(tmp_path) -> Path:
    """Tokens 'open', ' for'; feature L0#3 reads both tokens equally, feature L1#5 reads L0#3 (3/4) and the
    layer-1 error (1/4); the ' writing' logit reads L1#5 and the ' for' token equally."""
    nodes = [node("embedding", "E", 10, 0), node("embedding", "E", 11, 1),
             node("transcoder", "0", 3, 1, activation=1.5, clerp="'for' after verbs"),
             node("transcoder", "1", 5, 1, activation=2.0, clerp="file modes"),
             node("mlp reconstruction error", "1", -1, 1),
             node("logit", "2", 99, 1, token_prob=0.9, clerp="output ' writing' (p=0.900)"),
             node("logit", "2", 98, 1, token_prob=0.05, clerp="output ' write' (p=0.050)")]
    nodes[0]["node_id"], nodes[1]["node_id"] = "E_10_0", "E_11_1"
    nodes[5]["node_id"], nodes[6]["node_id"] = "L_99_1", "L_98_1"
    links = [("E_10_0", "0_3_1", 2.0), ("E_11_1", "0_3_1", -2.0), ("0_3_1", "1_5_1", 3.0), ("1_err_1", "1_5_1", 1.0),
             ("1_5_1", "L_99_1", 4.0), ("E_11_1", "L_99_1", 4.0), ("E_11_1", "L_98_1", 1.0)]
    meta = {"prompt_tokens": ["open", " for"], "prompt_ids": [10, 11], "influence_kept": 0.9,
            "replacement_score": 0.8, "completeness_score": 0.7, "n_nodes_before": 40, "n_edges_before": 300,
            "train": "tc"}
    path = tmp_path / "graphs" / "tc" / "g.json"
    write_graph(path, meta, nodes, [{"source": s, "target": t, "weight": w} for s, t, w in links], [])
    return path


def read(*args) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_paths_and_shares_of_the_top_logit(small_graph):
    out = read(small_graph, "--paths", "4")
    assert "prompt: 'open for' (2 tokens)" in out
    assert "7 nodes, 7 edges (before: 40 nodes, 300 edges); influence kept 0.900, replacement 0.800" in out
    assert "outputs: output ' writing' (p=0.900), output ' write' (p=0.050)" in out
    # 1/2 straight from the ' for' token, 1/2 through L1#5, of which 1/4 comes from the error node
    assert "embedding 0.875, mlp reconstruction error 0.125" in out
    assert "0.500  L1 #5 @1 ' for' act 2.00 \"file modes\"" in out
    assert "0.375  L0 #3 @1 ' for' act 1.50 \"'for' after verbs\"" in out
    paths = out.split("top 4 paths")[1]
    assert paths.index("0.500  token @1 ' for'") < paths.index("0.188  token @0 'open'") < paths.index("0.125  error L1")
    assert "[-2] -> L0 #3 @1" in paths and "[+3] -> L1 #5 @1" in paths  # signed weights of each hop


def test_another_logit_and_a_bad_choice(small_graph):
    assert "where output ' write' (p=0.050) comes from (shares of its input in the pruned graph): embedding 1.000" \
        in read(small_graph, "--logit", "1")
    done = subprocess.run([sys.executable, str(SCRIPT), str(small_graph), "--logit", "5"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "--logit 5 is out of range; the graph has 2 logits" in done.stderr
