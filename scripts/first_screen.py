"""What a new user sees first on the Features page: for every SAE of every index of a run, how many of the first
N features (20 by default) have a whitespace/punctuation-only explanation, and how many distinct explanations
they show, under the old default sort (max activation) and the new one (sae/analysis/ranking.py: explanation
score, always-on and outlier-only features set aside), side by side.

    python scripts/first_screen.py runs/demo            # e.g. after `strata demo --serve false`
    python scripts/first_screen.py runs/demo --first 20 --show 5

An explanation counts as whitespace/punctuation-only ("blank") when every token it names ("fires on '\\n' (64%),
',' (20%)", the offline explainer's form) is made of whitespace, punctuation or symbol characters only, and as
"mostly" blank when such tokens carry more than half of the named share ("fires on '\\n' (64%), ' are' (34%)").
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations import layout  # noqa: E402
from sae.analysis.index_file import FeatureIndex  # noqa: E402
from sae.analysis.ranking import blank_token, formatting_features, ranked_features  # noqa: E402

NAMED = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*") \((\d+)%\)""")


def blank(text: str) -> bool:
    """Whether every token the explanation names is whitespace, punctuation or symbols only."""
    named = [ast.literal_eval(m) for m, _ in NAMED.findall(str(text))]
    return bool(named) and all(blank_token(s) for s in named)


def mostly_blank(text: str) -> bool:
    """Whether the tokens it names that are whitespace, punctuation or symbols only carry most of the share."""
    named = [(ast.literal_eval(m), int(p)) for m, p in NAMED.findall(str(text))]
    return bool(named) and 2 * sum(p for s, p in named if blank_token(s)) > sum(p for _, p in named)


def first_screens(idx: FeatureIndex, sid: str, first: int) -> dict[str, np.ndarray]:
    freq, mean, mx = (idx.column(sid, c) for c in ("frequency", "mean_act", "max_act"))
    old = np.argsort(-mx, kind="stable")[:first]
    col = idx.column
    new, _ = ranked_features(col(sid, "explanation_score"), freq, mean, mx, col(sid, "explanation"),
                             formatting_features(col(sid, "top_tokens"), col(sid, "top_value"), idx.vocab))
    return {"old (max activation)": old, "new (explanation score, filtered)": new[:first]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--first", type=int, default=20, help="features on the first screen")
    p.add_argument("--show", type=int, default=0, help="print the first explanations of each screen")
    args = p.parse_args()
    names = sorted(p.stem for p in layout.index_path(args.run, "x").parent.glob("*.h5"))
    totals: dict[str, np.ndarray] = {}
    print(f"{'index':<8} {'SAE':<12} {'sort':<36} {'blank':>5} {'mostly':>6} {'distinct':>8}")
    for name in names:
        idx = FeatureIndex(layout.index_path(args.run, name))
        for sid in idx.sae_ids:
            expl = idx.column(sid, "explanation")
            if expl is None:
                print(f"{name:<8} {sid:<12} no explanations in the index")
                continue
            for label, feats in first_screens(idx, sid, args.first).items():
                counts = np.array([sum(blank(expl[f]) for f in feats), sum(mostly_blank(expl[f]) for f in feats),
                                   len({expl[f] for f in feats}), len(feats)])
                totals[label] = totals.get(label, 0) + counts
                print(f"{name:<8} {sid:<12} {label:<36} {counts[0]:>5} {counts[1]:>6} {counts[2]:>8}")
                for f in feats[:args.show]:
                    print(f"{'':<22}#{int(f)}: {expl[f]}")
        idx.close()
    for label, (n_blank, n_mostly, distinct, n) in totals.items():
        print(f"all SAEs, {label}: of {n} first-screen features {n_blank} whitespace/punctuation-only, {n_mostly} "
              f"mostly, {distinct} distinct explanations")


if __name__ == "__main__":
    main()
