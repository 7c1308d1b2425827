"""The Circuits page's one write: supernodes (named groups of nodes) and pinned nodes go into the graph file's
qParams. The file is read back and checked to be a Strata graph first, every named node must be in it, and the
whole file is rewritten atomically with only qParams changed (the same file, nothing else in the run)."""
from __future__ import annotations

from activations import layout
from activations.atomic import atomic_write_json
from activations.errors import StrataError
from dashboard import data


def save_qparams(run, train: str, graph: str, supernodes: list[list[str]], pinned: list[str]) -> None:
    doc = data.read_graph(run, train, graph)
    ids = {n["node_id"] for n in doc["nodes"]}
    for group in supernodes:
        label, members = (group[0], group[1:]) if group else ("", [])
        if not str(label).strip():
            raise StrataError("a supernode needs a name; type a label for the group")
        if not members:
            raise StrataError(f"supernode {label!r} has no nodes; select one or more nodes of the graph")
    unknown = [i for i in [*pinned, *(i for g in supernodes for i in g[1:])] if i not in ids]
    if unknown:
        raise StrataError(f"node {unknown[0]!r} is not in graph {graph}; group or pin nodes of this graph")
    doc["qParams"] = {**doc["qParams"], "pinnedIds": list(pinned),
                      "supernodes": [[str(g[0]).strip(), *g[1:]] for g in supernodes]}
    atomic_write_json(data.inside(run, layout.graph_path(run, train, graph)), doc)
