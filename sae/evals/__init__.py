"""Evaluation suites of `strata eval --suite ...` (the registry is suite.py; sae/evaluate.py runs them).

Each suite is a module with `run(ctx: SuiteContext) -> dict`, returning
    {"saes": {sae_id: {"overall": {metric: value}, "per_key": {key: {metric: value}}}}, "details": {...}}
Metric names of a suite other than core start with "<suite>_" (absorption_mean, probing_k1_accuracy, ...), so
eval.json can hold every suite's metrics side by side in each SAE's `overall` and `per_key`, and the dashboard
and the sweep frontier read them as columns.
"""

# eval.json metrics where more is better (every other metric: less is better, or neither, e.g. l0 and shrinkage,
# which the sweep frontier plots lower-is-better as it always has)
HIGHER_IS_BETTER = {"explained_variance", "cosine", "frac_alive", "ce_loss_recovered", "kl_recovered",
                    "autointerp_detection_mean", "autointerp_detection_f1_mean", "autointerp_fuzzing_mean",
                    "autointerp_features_scored", "absorption_letters_scored"}


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER or metric.endswith("_accuracy")
