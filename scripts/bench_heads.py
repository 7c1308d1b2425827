"""Benchmark of head attribution (sae/analysis/heads.py) against the analysis pass it follows, in one run.

Harvests the embedded SmolLM2-135M at attention outputs (built-in corpus), trains one TopK SAE per layer, runs
`strata analyze` and prints, from the index's meta, the seconds of the pass, of head attribution (the model run
again on the contexts that hold top activations, early exit after the deepest layer) and of the whole analysis,
with their ratios. A run folder given with --run is reused (harvest and training are skipped when present).

    python scripts/bench_heads.py                                  # 32k tokens, attn_out 3,9,15, 4608 latents
    python scripts/bench_heads.py --tokens 131072 --data all       # the whole run (analyze's default: held out)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations import layout  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run folder (default: a temporary one)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--layers", default="3,9,15")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--data", default="heldout", choices=["heldout", "all"])
    args = p.parse_args()

    from activations.config import HarvestConfig
    from activations.harvest import harvest
    from sae.analysis.analyze import AnalyzeConfig, analyze
    from sae.train import train
    from sae.train_config import TrainConfig

    run = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="bench-heads-")) / "run"
    if not layout.manifest_path(run).exists():
        harvest(HarvestConfig(run_dir=str(run), model=args.model, sites="attn_out", layers=args.layers,
                              context=args.context, max_tokens=args.tokens, progress=False))
    if not layout.checkpoint_dir(run, "bank").is_dir():
        train(TrainConfig(run_dir=str(run), name="bank", mode="layer", arch="topk", sites="attn_out",
                          layers=args.layers, expansion=args.expansion, k=args.k, max_tokens=args.tokens,
                          progress=False, wandb_mode="disabled"))
    (path,) = analyze(AnalyzeConfig(run_dir=str(run), name="bank", data=args.data, progress=False))
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(path)
    m = idx.meta
    n = {sid: idx.n_latents(sid) for sid in idx.sae_ids}
    contexts = {sid: int(idx.column(sid, "head_contexts").sum()) for sid in idx.sae_ids}
    idx.close()
    result = {"tokens_analysed": m["tokens"], "saes": n, "top_contexts_attributed": contexts,
              "seconds_pass": round(m["seconds_pass"], 2), "seconds_heads": round(m["seconds_heads"], 2),
              "seconds_total": round(m["seconds_total"], 2),
              "heads / pass": round(m["seconds_heads"] / m["seconds_pass"], 3),
              "heads / total": round(m["seconds_heads"] / m["seconds_total"], 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
