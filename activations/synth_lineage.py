"""The known features of a synthetic run (`strata synth`) and how they change from layer to layer.

A *feature* is a node with a lifetime: it is live at resid layers [born, last], with one unit direction per live
layer. Between layer L-1 and layer L every live feature undergoes one event:
    persist  same feature, its direction drifts a little (cosine about 1 - drift^2 / 2)
    rotate   same feature, new direction with cosine `rotate_cos` to the old one
    split    the feature ends at L-1; two children begin at L, each taking part of the parent's tokens
    merge    two features end at L-1; one child begins at L and fires on the union of their tokens
    vanish   the feature ends at L-1 (no child)
and new features appear at L with no parent. The lineage edges (parent at L-1 -> child at L, with their kind)
connect a feature to itself for persist/rotate and to its children for split/merge.

Which tokens a feature fires on is decided per token, once, and shared across the layers of a lineage: a root or
appearing feature fires on its own Bernoulli draw (power-law frequencies); a split child fires where its parent
fires and a per-token coin of that split picks its side; a merge child fires where either parent fires. The
coefficient of a firing is positive (log-normal, median 1) and inherited the same way (a merge child sums its
parents'). So correlation across depth links a feature to its lineage, as in a real model.

Everything here is pure numpy and deterministic from the seed; `Lineage.to_record` / `from_record` is the
JSON of RUN/synth/truth.json (directions go to RUN/synth/features.safetensors).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EVENTS = ("persist", "rotate", "split", "merge", "vanish")
ORIGINS = ("root", "appear", "split", "merge")


@dataclass
class Feature:
    id: int
    born: int                      # first resid layer it is live at
    last: int                      # last resid layer it is live at (inclusive)
    origin: str                    # root (live at layer 0), appear, split, merge
    parents: list[int] = field(default_factory=list)
    freq: float = 0.0              # expected fraction of tokens it fires on
    rotated_at: list[int] = field(default_factory=list)  # layers where its direction was rotated
    side: int = -1                 # split children: which side of the parent's coin (0 or 1)
    split_event: int = -1          # split children: index of the split (one coin per split)

    def live(self, layer: int) -> bool:
        return self.born <= layer <= self.last


@dataclass
class Lineage:
    n_layers: int                  # resid layers are 0 .. n_layers
    d_model: int
    features: list[Feature]
    edges: list[dict]              # {"layer": L, "parent": id, "child": id, "kind": persist|rotate|split|merge}
    directions: dict[int, np.ndarray]  # layer -> float32 [n_features, d] (rows of features not live are zero)
    n_splits: int = 0

    # ---- queries
    def live_ids(self, layer: int) -> np.ndarray:
        return np.array([f.id for f in self.features if f.live(layer)], dtype=np.int64)

    def changed_ids(self, layer: int) -> np.ndarray:
        """Features whose direction at `layer` is new there: born at `layer` (appear, split, merge) or rotated."""
        return np.array([f.id for f in self.features if f.live(layer) and (f.born == layer and layer > 0
                                                                          or layer in f.rotated_at)], dtype=np.int64)

    def links(self, layer: int, kinds=("persist", "rotate", "split", "merge")) -> set[tuple[int, int]]:
        """(parent, child) pairs of the edges from layer-1 to `layer`."""
        return {(e["parent"], e["child"]) for e in self.edges if e["layer"] == layer and e["kind"] in kinds}

    # ---- the JSON record
    def to_record(self) -> dict:
        return {"n_layers": self.n_layers, "d_model": self.d_model, "n_splits": self.n_splits,
                "features": [vars(f) | {"parents": list(f.parents), "rotated_at": list(f.rotated_at)}
                             for f in self.features],
                "edges": self.edges}

    @classmethod
    def from_record(cls, record: dict, directions: dict[int, np.ndarray]) -> Lineage:
        feats = [Feature(**f) for f in record["features"]]
        return cls(int(record["n_layers"]), int(record["d_model"]), feats, list(record["edges"]), directions,
                   int(record.get("n_splits", 0)))


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _tilt(rng: np.random.Generator, d: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector with cosine `cos` to unit vector `d`, in a random direction."""
    r = rng.standard_normal(d.shape)
    r -= (r @ d) * d
    r /= np.linalg.norm(r)
    return _unit(cos * d + np.sqrt(max(0.0, 1 - cos * cos)) * r)


def power_law_freqs(rng: np.random.Generator, n: int, mean_active: float, exponent: float, max_freq: float) -> np.ndarray:
    """n frequencies p_i ~ c (i+1)^-exponent, capped at max_freq, scaled so they sum to mean_active, in random order."""
    base = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    lo, hi = 0.0, mean_active / base[-1] + 1.0
    for _ in range(100):  # bisection on the scale c: sum(min(c base, max_freq)) = mean_active
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.minimum(c * base, max_freq).sum() < mean_active else (lo, c)
    return rng.permutation(np.minimum(c * base, max_freq))


def build_lineage(rng: np.random.Generator, n_layers: int, d_model: int, n_features: int, mean_active: float,
                  exponent: float, max_freq: float, rates: dict, drift: float, rotate_cos: float,
                  child_cos: float) -> Lineage:
    """A random lineage: `n_features` roots at layer 0, then per transition the fractions `rates` of live features
    (keys rotate, split, merge, vanish, appear) undergo that event; the rest persist."""
    freqs = list(power_law_freqs(rng, n_features, mean_active, exponent, max_freq))
    feats = [Feature(i, 0, n_layers, "root", freq=float(freqs[i])) for i in range(n_features)]
    dirs = {i: {0: _unit(rng.standard_normal(d_model))} for i in range(n_features)}  # id -> layer -> direction
    edges: list[dict] = []
    n_splits = 0

    def new(layer, origin, parents, freq, direction, **kw):
        f = Feature(len(feats), layer, n_layers, origin, parents, float(freq), **kw)
        feats.append(f)
        dirs[f.id] = {layer: direction}
        return f

    for L in range(1, n_layers + 1):
        live = [f for f in feats if f.live(L - 1)]
        order = [live[i] for i in rng.permutation(len(live))]
        counts = {k: int(round(rates.get(k, 0.0) * len(live))) for k in ("rotate", "split", "merge", "vanish")}
        take = iter(order)
        for f in [next(take) for _ in range(min(counts["split"], len(live)))]:
            f.last = L - 1
            for side in (0, 1):
                c = new(L, "split", [f.id], f.freq / 2, _tilt(rng, dirs[f.id][L - 1], child_cos), side=side,
                        split_event=n_splits)
                edges.append({"layer": L, "parent": f.id, "child": c.id, "kind": "split"})
            n_splits += 1
        rest = list(take)
        n_merge = min(counts["merge"], len(rest) // 2)
        for a, b in zip(rest[:n_merge], rest[n_merge:2 * n_merge]):
            a.last = b.last = L - 1
            c = new(L, "merge", [a.id, b.id], min(1.0, a.freq + b.freq), _unit(dirs[a.id][L - 1] + dirs[b.id][L - 1]))
            edges += [{"layer": L, "parent": p.id, "child": c.id, "kind": "merge"} for p in (a, b)]
        rest = rest[2 * n_merge:]
        for f in rest[:counts["vanish"]]:
            f.last = L - 1
        rest = rest[counts["vanish"]:]
        for i, f in enumerate(rest):
            if i < counts["rotate"]:
                dirs[f.id][L] = _tilt(rng, dirs[f.id][L - 1], rotate_cos)
                f.rotated_at.append(L)
                kind = "rotate"
            else:
                dirs[f.id][L] = _tilt(rng, dirs[f.id][L - 1], 1 - drift * drift / 2)
                kind = "persist"
            edges.append({"layer": L, "parent": f.id, "child": f.id, "kind": kind})
        n_appear = int(round(rates.get("appear", 0.0) * len(live)))
        for p in rng.choice(freqs, size=n_appear):
            new(L, "appear", [], p, _unit(rng.standard_normal(d_model)))
    directions = {}
    for L in range(n_layers + 1):
        D = np.zeros((len(feats), d_model), dtype=np.float32)
        for f in feats:
            if f.live(L):
                D[f.id] = dirs[f.id][L]
        directions[L] = D
    return Lineage(n_layers, d_model, feats, edges, directions, n_splits)


def sample_codes(lineage: Lineage, rng: np.random.Generator, n_tokens: int) -> np.ndarray:
    """Coefficients [n_tokens, n_features] float32 (0 where a feature does not fire): the per-token draws of
    every root and appearing feature, carried down the lineage (see the module docstring)."""
    feats = lineage.features
    codes = np.zeros((n_tokens, len(feats)), dtype=np.float32)
    coins = rng.random((n_tokens, max(1, lineage.n_splits))) < 0.5
    for f in feats:  # parents always come before their children
        if f.origin in ("root", "appear"):
            fires = rng.random(n_tokens) < f.freq
            codes[fires, f.id] = np.exp(0.5 * rng.standard_normal(int(fires.sum()))).astype(np.float32)
        elif f.origin == "split":
            codes[:, f.id] = codes[:, f.parents[0]] * (coins[:, f.split_event] == bool(f.side))
        else:
            codes[:, f.id] = codes[:, f.parents].sum(1)
    return codes
