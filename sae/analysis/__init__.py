"""The feature index: `strata analyze` (analyze.py) and its file format (index_file.py).

    from sae.analysis.analyze import AnalyzeConfig, analyze      # analyze(AnalyzeConfig(run_dir=RUN)) -> [paths]
    from sae.analysis.index_file import FeatureIndex            # FeatureIndex(RUN/index/<name>.h5).feature(sid, i)

Pieces, in the order data flows: source.py (blocks of consecutive tokens) -> indexer.py (per-SAE running
statistics; topk.py, histogram.py) -> stream.py (all SAEs at once, neighbours, depth.py, similarity.py) ->
explain.py -> index_file.py.
"""
