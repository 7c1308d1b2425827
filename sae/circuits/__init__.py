"""Attribution graphs on a run's own transcoders: the frozen clean pass (frozen.py), the transcoder adapter
(adapter.py), direct effects between nodes (attribute.py), pruning and graph scores (prune.py), the graph JSON
(graph_file.py) and the `strata graph` verb (graph.py)."""
