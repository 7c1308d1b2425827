"""The feature index file, RUN/index/<name>.h5: written by `strata analyze` (statistics first, then the
explanations of a slow explainer are swapped in by `update_explanations`), read by the dashboard.

Layout (every per-feature dataset has the feature as its first axis, chunked by 256 features so one
feature's page reads a few small chunks):
  attrs      format_version, meta (JSON: train name, tokens analysed, shards, window, settings, notes, seconds of
             the pass, of head attribution and in all)
  vocab      UTF-8 string per token id (decoded by the run's tokenizer; absent if it could not be loaded)
  residual_similarity   JSON attr: [{a, b, cos_centred, cos_raw, n}] for adjacent residual layers
  saes/<sae_id>         attrs: info (JSON: cfg, slot keys and layers, vectors, match_next)
      count frequency mean_act max_act hist_counts hist_hi neighbour_idx neighbour_cos
      top_{value,row,slot,acts,tokens}  sample_{value,row,slot,acts,tokens,interval}
      layer_count layer_sum [n, slots]; multilayer: layer_mass mean_layer layer_entropy n_layers_active
      crosscoder: decoder_layer_norm; bank: match_{idx,cos,corr} best_next_{idx,corr,cos}
      causal LM: logit_{top,bottom}_{ids,vals}; explanation (string), explanation_score
      attn_out SAEs (per-layer, multi-layer; heads.py): shares of each head (H) and of the constant in the
        pre-activation on each top context, top_head_share [n, top_k, H] and top_head_bias_share [n, top_k]
        (NaN = no context), and their means over the top contexts at each of the SAE's L layers (1 for a per-layer
        SAE): head_share [n, L, H], head_bias_share [n, L] (NaN = none there), head_contexts [n, L] int32
      attrs explained (JSON {explainer, features}): the first `features` explanations come from that explainer
  negatives/<sid>       tokens [m, window], codes [m, n]: random contexts kept to score explanations again
  matches/<j>           one matched pair of SAEs (sae/analysis/depth.py: adjacent SAEs of a bank, cross-site pairs
                        resid.L -> mlp_out.L / attn_out.L -> resid.L+1, pairs named with `--match UP:DOWN`);
      attrs up, down (sae ids), up_key, down_key (activation keys), kind ("bank" | "cross-site" | "user"),
            methods (JSON list of "cosine", "correlation", "causal", "saematch"), agreement (JSON {method:
            fraction of the features with a best match whose own pick is that match})
      first axis = upstream feature: cand_idx [n_up, m] int32 (downstream candidates by decoder cosine),
      cand_cos, cand_corr, cand_effect [n_up, m] float32 (causal effect, causal.py; NaN = not measured),
      best_idx [n_up] int32 (largest causal effect >= min_effect, or without causal effects the highest
      correlation >= min_link; -1 = none), best_effect, best_corr, best_cos [n_up] float32,
      saematch_idx [n_up] int32 (SAE Match assignment, -1 = unassigned), saematch_score [n_up] float32,
      agree [n_up] uint8: bits of the methods whose own top pick is best_idx (1 cosine, 2 correlation,
      4 causal, 8 saematch)
  paths/<i>             features [P, n_saes] (-1 = none), score [P] (mean causal effect of the links, or mean
                        correlation); attrs saes (JSON list), method ("causal" or "correlation")
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from activations.atomic import atomic_path
from activations.errors import StrataError

FORMAT_VERSION = 1
MATCH_ARRAYS = ("cand_idx", "cand_cos", "cand_corr", "cand_effect", "best_idx", "best_effect", "best_corr", "best_cos",
                "saematch_idx", "saematch_score", "agree")
MATCH_ATTRS = ("up", "down", "up_key", "down_key", "kind")
SKIP = {"neg_tokens", "neg_codes", "vectors", "match_next", "sum", "sumsq"}
NEGATIVES = {"neg_tokens": "tokens", "neg_codes": "codes"}  # not per feature: stored under negatives/<sid>
STR = h5py.string_dtype("utf-8")


def _np(v):
    return v.numpy() if hasattr(v, "numpy") else np.asarray(v)


def _strings(items) -> np.ndarray:
    """HDF5 strings cannot hold NUL: show it as the symbol for NUL (display only)."""
    return np.array([str(x).replace("\x00", "\u2400") for x in items], dtype=object)


def _put(group, name, arr):
    arr = _np(arr)
    if arr.dtype == np.float64 and name not in ("hist_hi",):
        arr = arr.astype(np.float32)
    chunks = (min(256, len(arr)), *arr.shape[1:]) if arr.ndim >= 1 and len(arr) else None
    group.create_dataset(name, data=arr, chunks=chunks, track_times=False)


def write_index(path, meta: dict, saes: dict, sae_info: dict, paths: list, residual_similarity: list,
                vocab: list[str] | None, matches: list | None = None) -> Path:
    """Write atomically: `path` holds a complete index or the previous one."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["meta"] = json.dumps(meta)
            f.attrs["residual_similarity"] = json.dumps(residual_similarity)
            if vocab is not None:
                f.create_dataset("vocab", data=_strings(vocab), dtype=STR)
            for sid, fields in saes.items():
                g = f.create_group(f"saes/{sid}")
                g.attrs["info"] = json.dumps(sae_info[sid])
                for name, arr in fields.items():
                    if name in NEGATIVES:
                        f.create_dataset(f"negatives/{sid}/{NEGATIVES[name]}", data=_np(arr), track_times=False)
                    if name in SKIP:
                        continue
                    if name == "explanation":
                        g.create_dataset(name, data=_strings(arr), dtype=STR)
                    else:
                        _put(g, name, arr)
            for i, p in enumerate(paths):
                g = f.create_group(f"paths/{i}")
                g.attrs["saes"] = json.dumps(p["saes"])
                g.attrs["method"] = p.get("method", "correlation")
                _put(g, "features", p["features"])
                _put(g, "score", p["score"])
            for j, m in enumerate(matches or []):
                g = f.create_group(f"matches/{j}")
                for name in MATCH_ATTRS:
                    g.attrs[name] = m[name]
                g.attrs["methods"] = json.dumps(m["methods"])
                g.attrs["agreement"] = json.dumps(m.get("agreement", {}))
                for name in MATCH_ARRAYS:
                    _put(g, name, m[name])
    return path


def update_explanations(path, explanations: dict, explainer: str, label: str) -> None:
    """Replace the explanations of some SAEs of an index: `explanations` maps sae id -> (texts, scores, done),
    the first `done` of them from `explainer`; meta["explainer"] becomes `label` (what the dashboard shows).
    Atomic like write_index: a copy is changed and swapped in."""
    import shutil

    path = Path(path)
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            meta = json.loads(f.attrs["meta"])
            meta["explainer"] = label
            f.attrs["meta"] = json.dumps(meta)
            for sid, (texts, scores, done) in explanations.items():
                g = f[f"saes/{sid}"]
                for name in ("explanation", "explanation_score"):
                    if name in g:
                        del g[name]
                g.create_dataset("explanation", data=_strings(texts), dtype=STR)
                _put(g, "explanation_score", np.asarray(scores, dtype=np.float32))
                g.attrs["explained"] = json.dumps({"explainer": explainer, "features": int(done)})


class FeatureIndex:
    """Read access to an index file. Opened read-only; cheap per-feature reads."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise StrataError(f"no feature index at {self.path}; run `strata analyze` on this run first")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise StrataError(f"{self.path} is not a readable index ({e}); rerun `strata analyze`") from None
        if int(self.file.attrs.get("format_version", 0)) != FORMAT_VERSION:
            raise StrataError(f"{self.path} has index format {self.file.attrs.get('format_version')}, expected "
                              f"{FORMAT_VERSION}; rerun `strata analyze`")
        self.meta = json.loads(self.file.attrs["meta"])
        self.residual_similarity = json.loads(self.file.attrs["residual_similarity"])
        self.vocab = [s.decode() if isinstance(s, bytes) else s for s in self.file["vocab"][()]] \
            if "vocab" in self.file else None
        self.sae_ids = list(self.file["saes"].keys()) if "saes" in self.file else []
        self._info = {sid: json.loads(self.file[f"saes/{sid}"].attrs["info"]) for sid in self.sae_ids}
        self.paths = [{"saes": json.loads(g.attrs["saes"]), "features": g["features"][()], "score": g["score"][()],
                       "method": g.attrs.get("method", "correlation")}
                      for _, g in sorted(self.file["paths"].items(), key=lambda kv: int(kv[0]))] \
            if "paths" in self.file else []

    def close(self):
        self.file.close()

    def info(self, sid: str) -> dict:
        if sid not in self._info:
            raise StrataError(f"no SAE {sid!r} in this index; choose one of {', '.join(self.sae_ids)}")
        return self._info[sid]

    def n_latents(self, sid: str) -> int:
        return int(self.info(sid)["n_latents"])

    def has(self, sid: str, name: str) -> bool:
        return name in self.file[f"saes/{sid}"]

    def column(self, sid: str, name: str) -> np.ndarray:
        """A whole per-feature array (e.g. frequency for every feature)."""
        g = self.file[f"saes/{sid}"]
        if name not in g:
            return None
        data = g[name][()]
        if name == "explanation":
            data = np.array([s.decode() if isinstance(s, bytes) else s for s in data], dtype=object)
        return data

    def feature(self, sid: str, i: int) -> dict:
        """Every stored field of feature i."""
        n = self.n_latents(sid)
        if not 0 <= i < n:
            raise StrataError(f"feature {i} does not exist in {sid} (0-{n - 1}); pick one in range")
        g = self.file[f"saes/{sid}"]
        out = {}
        for name, ds in g.items():
            v = ds[i]
            out[name] = v.decode() if isinstance(v, bytes) else v
        return out

    def negatives(self, sid: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens [m, window], codes [m, n]) of the random contexts kept to score explanations, if stored."""
        g = self.file.get(f"negatives/{sid}")
        return (g["tokens"][()], g["codes"][()]) if g is not None else None

    def explained(self, sid: str) -> dict:
        """{explainer, features}: how many of the SAE's first features that explainer explained ({} if unknown)."""
        return json.loads(self.file[f"saes/{sid}"].attrs.get("explained", "{}"))

    def matches(self) -> list[dict]:
        """Attributes of every matches/<j> group, with "j" (methods and agreement parsed); [] for an index
        written before causal matches (re-run `strata analyze` for them)."""
        if "matches" not in self.file:
            return []
        out = []
        for j, g in sorted(self.file["matches"].items(), key=lambda kv: int(kv[0])):
            a = {k: g.attrs[k] for k in MATCH_ATTRS}
            out.append({"j": int(j), **a, "methods": json.loads(g.attrs["methods"]),
                        "agreement": json.loads(g.attrs.get("agreement", "{}"))})
        return out

    def match_arrays(self, j: int) -> dict[str, np.ndarray]:
        """Every dataset of matches/<j> (MATCH_ARRAYS)."""
        if f"matches/{int(j)}" not in self.file:
            raise StrataError(f"no match {j} in {self.path}; it has {len(self.matches())}")
        return {name: ds[()] for name, ds in self.file[f"matches/{int(j)}"].items()}

    def lineage(self, sid: str, i: int, top: int = 5) -> dict[str, list[dict]]:
        """Where feature i of `sid` comes from and goes: "upstream" = features of other SAEs whose best match
        is (sid, i); "downstream" = its candidates in each SAE it is matched to. Each entry {sae, feature,
        effect, corr, cos, agree, kind}, largest effect first (NaN last), at most `top` per direction.
        A downstream entry's `agree` holds the bits of the methods whose own pick is that candidate."""
        up, down = [], []
        for m in self.matches():
            g = self.file[f"matches/{m['j']}"]
            if m["down"] == sid:
                best = g["best_idx"][()]
                for r in np.nonzero(best == i)[0]:
                    up.append({"sae": m["up"], "feature": int(r), "effect": float(g["best_effect"][r]),
                               "corr": float(g["best_corr"][r]), "cos": float(g["best_cos"][r]),
                               "agree": int(g["agree"][r]), "kind": m["kind"]})
            if m["up"] == sid:
                cand, cos, corr, eff = (g[n][i] for n in ("cand_idx", "cand_cos", "cand_corr", "cand_effect"))
                picks = {1: int(cand[0]), 2: _argbest(cand, corr), 4: int(g["best_idx"][i]) if "causal" in
                         m["methods"] else -1, 8: int(g["saematch_idx"][i])}
                for c in range(len(cand)):
                    agree = sum(bit for bit, pick in picks.items() if pick == int(cand[c]))
                    down.append({"sae": m["down"], "feature": int(cand[c]), "effect": float(eff[c]),
                                 "corr": float(corr[c]), "cos": float(cos[c]), "agree": agree, "kind": m["kind"]})

        def strongest(rows):
            return sorted(rows, key=lambda e: (not np.isfinite(e["effect"]), -np.nan_to_num(e["effect"]),
                                               -e["corr"]))[:top]

        return {"upstream": strongest(up), "downstream": strongest(down)}

    def token_str(self, t: int) -> str:
        if self.vocab is not None and 0 <= t < len(self.vocab):
            return self.vocab[t]
        return f"<{t}>"


def _argbest(cand: np.ndarray, score: np.ndarray) -> int:
    """The candidate with the highest finite score (-1 if none)."""
    ok = np.isfinite(score)
    return int(cand[ok][np.argmax(score[ok])]) if ok.any() else -1
