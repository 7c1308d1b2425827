"""Evaluation suites of `strata eval --suite ...` (the registry is suite.py; sae/evaluate.py runs them).

Each suite is a module with `run(ctx: SuiteContext) -> dict`, returning
    {"saes": {sae_id: {"overall": {metric: value}, "per_key": {key: {metric: value}}}}, "details": {...}}
Metric names of a suite other than core start with "<suite>_" (absorption_mean, probing_k1_accuracy, ...), so
eval.json can hold every suite's metrics side by side in each SAE's `overall` and `per_key`, and the dashboard
and the sweep frontier read them as columns.
"""
