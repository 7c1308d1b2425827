"""Helpers for the dashboard tests: a run directory whose feature index is built from synthetic activations by
the real analysis pass (no model, no training), with a vocabulary the test chooses (e.g. XSS payloads)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from activations import layout
from sae.analysis.index_file import write_index
from sae.analysis.indexer import IndexerSettings
from sae.analysis.source import array_blocks
from sae.analysis.stream import index_saes, slots_of

XSS_PAYLOADS = [
    "<script>document.title='pwned-script'</script>",
    "<img src=x onerror=\"document.title='pwned-img'\">",
    "<b onmouseover=alert(1)>bold</b>",
    "\" onmouseover=\"alert(1)",
    "<svg/onload=alert(1)>",
    "</div></table><a href=javascript:alert(1)>x</a>",
]


class SynthSAE:
    def __init__(self, d, n, k, keys, mode="layer", seed=0, W_dec=None):
        g = torch.Generator().manual_seed(seed)
        d_in = d * (len(keys) if mode == "crosscoder" else 1)
        d_out = d * (len(keys) if mode == "crosscoder" else 1)
        self.W_enc = torch.randn(d_in, n, generator=g)
        self.b = torch.randn(n, generator=g) * 0.1
        self.W_dec = W_dec if W_dec is not None else torch.randn(n, d_out, generator=g)
        self.k = k
        self.cfg = SimpleNamespace(n_latents=n, k=k, mode=mode, in_keys=list(keys), out_keys=list(keys), d_in=d_in,
                                   d_out=d_out, arch="topk", layers=[int(x.rsplit(".", 1)[1]) for x in keys])
        self.cfg.to_dict = lambda: {k_: v for k_, v in vars(self.cfg).items() if k_ != "to_dict"}

    def encode(self, x, key=None):
        pre = torch.relu(x @ self.W_enc + self.b)
        top = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter(1, top.indices, top.values)


def synthetic_run(root: Path, vocab: list[str], tokens: int = 2000, d: int = 16, n: int = 32, name: str = "synth") -> Path:
    """A run dir with manifest, training metrics, eval.json and a feature index of three per-layer SAEs,
    one multi-layer SAE and one crosscoder over resid.0-2."""
    root.mkdir(parents=True, exist_ok=True)
    keys = ["resid.0", "resid.1", "resid.2"]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(tokens, d, generator=g)
    acts = {k: base + 0.3 * i * torch.randn(tokens, d, generator=g) for i, k in enumerate(keys)}
    token_ids = torch.randint(0, len(vocab), (tokens,), generator=g)
    doc_ids = torch.arange(tokens) // 40
    ctx_ids = torch.arange(tokens) // 32
    shared = torch.randn(n, d, generator=g)
    saes = {f"resid.{i}": SynthSAE(d, n, 4, [k], seed=i, W_dec=shared + 0.2 * i * torch.randn(n, d, generator=g))
            for i, k in enumerate(keys)}
    saes["multi"] = SynthSAE(d, n, 4, keys, mode="multilayer", seed=7)
    saes["cross"] = SynthSAE(d, n, 4, keys, mode="crosscoder", seed=8)
    settings = IndexerSettings(top_k=8, window=4, sample_size=20, intervals=4, per_interval=3, negatives=32)
    res = index_saes(saes, array_blocks(acts, token_ids, doc_ids, ctx_ids, 256, 4, "cpu"), settings, "cpu",
                     residual_pairs=[("resid.0", "resid.1"), ("resid.1", "resid.2")], min_link=0.0)
    from sae.analysis.explain import TokenExplainer, explain_feature

    for sid, r in res["saes"].items():
        texts, scores = zip(*(explain_feature(TokenExplainer(), f, r, vocab) for f in range(n)))
        r["explanation"], r["explanation_score"] = list(texts), torch.tensor(scores)
        # logit effects over the synthetic vocabulary (random unembedding)
        W_U = torch.randn(len(vocab), saes[sid].W_dec.shape[1], generator=g)
        logits = saes[sid].W_dec @ W_U.T
        k = min(5, len(vocab))
        r["logit_top_vals"], r["logit_top_ids"] = torch.topk(logits, k, 1)
        r["logit_bottom_vals"], r["logit_bottom_ids"] = torch.topk(logits, k, 1, largest=False)
    info = {sid: {"cfg": s.cfg.to_dict(), "n_latents": n, "mode": s.cfg.mode, "slots": slots_of(s),
                  "vectors": int(res["saes"][sid]["vectors"]), "match_next": res["saes"][sid].get("match_next")}
            for sid, s in saes.items()}
    meta = {"train_name": name, "tokens": tokens, "data": "all", "shards": [0], "notes": [], "explainer": "tokens"}
    write_index(layout.index_path(root, name), meta, res["saes"], info, res["paths"], res["residual_similarity"], vocab)

    manifest = {"model": {"id": "synthetic", "n_layers": 3, "d_model": d, "vocab_size": len(vocab),
                          "architecture": "none", "causal_lm": True},
                "tokenizer": {}, "keys": keys, "dims": {k: d for k in keys}, "dtype": "float16", "context_length": 32,
                "config": {}, "corpus": {"name": "synthetic"}, "shards": [], "norm_stats": {}, "n_tokens": tokens,
                "complete": True, "versions": {}, "format_version": 1}
    layout.manifest_path(root).write_text(json.dumps(manifest))
    tdir = layout.train_dir(root, name)
    layout.checkpoint_dir(root, name).mkdir(parents=True, exist_ok=True)
    with open(layout.metrics_path(root, name), "w") as f:
        f.writelines(json.dumps({"step": step, "tokens": 256 * step, "lr": 3e-4, "tokens_per_s": 1e4, "saes": {
            sid: {"loss": 2.0 - step / 100, "fvu": 1.0 / (1 + step) + 0.01 * i, "l0": 4.0, "frac_dead": 0.1,
                  **({f"fvu/{k}": 0.5 for k in sae.cfg.in_keys} if len(sae.cfg.in_keys) > 1 else {})}
            for i, (sid, sae) in enumerate(saes.items())}}) + "\n" for step in range(10, 110, 10))  # as sae/train.py logs
    # the shape `strata eval` writes: per SAE an "overall" summary (and per-key details)
    (tdir / "eval.json").write_text(json.dumps({"name": name, "heldout_shards": [0], "saes": {
        sid: {"overall": {"l0": 4.0, "fvu": 0.2 + 0.01 * i, "frac_dead": 0.1, "ce_loss_recovered": 0.9}, "per_key": {}}
        for i, sid in enumerate(saes)}}))
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dashboard_server(run, read_only: bool = True):
    """`strata dashboard RUN` served on a free local port for a browser test: yields its URL once Streamlit
    answers, and stops the server after."""
    from dashboard.serve import serve_dashboard, wait_until_up

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_dashboard(run, read_only=read_only, port=port, host="127.0.0.1", block=False)
    try:
        assert wait_until_up(url, proc, timeout=90), "streamlit did not come up"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ---------------------------------------------------------------- headless Chromium (Debian's `chromium`)
def chromium_path() -> str | None:
    """Debian's chromium (scripts/setup.sh installs it); Playwright drives it, no browser is downloaded."""
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


needs_chromium = pytest.mark.skipif(chromium_path() is None,
                                    reason="Debian's chromium is not installed (scripts/setup.sh installs it)")


def chromium_launch_args(base: dict) -> dict:
    """pytest-playwright's launch options, pointed at the system chromium."""
    return {**base, "executable_path": chromium_path()}


def build_analyzed_run(dest: Path, harvested: Path) -> Path:
    """The real chain on a copy of a harvested tiny run: train a per-layer TopK bank and a multi-layer SAE on
    resid.0-3, then `strata analyze` both (held-out shard)."""
    import shutil

    from sae.analysis.analyze import AnalyzeConfig, analyze
    from sae.train import train
    from sae.train_config import TrainConfig

    run = dest / "run"
    shutil.copytree(harvested, run, ignore=shutil.ignore_patterns("train", "index", "share"))
    for mode in ("layer", "multilayer"):
        train(TrainConfig(run_dir=str(run), name=f"topk-{mode}", mode=mode, sites="resid", layers="all",
                          expansion=2, k=4, batch_size=256, max_tokens=4096, progress=False, wandb_mode="disabled",
                          device="cpu"))
    analyze(AnalyzeConfig(run_dir=str(run), progress=False, device="cpu"))
    return run


def add_matches(index_path: Path, user_pair: tuple[str, str] | None = None) -> None:
    """Write matches/<j> groups (the shared schema sae/analysis/index_file.py reads) into an index that has a
    per-layer bank's correlation matches, standing in for `strata analyze`'s causal matching: candidates and
    cosines/correlations are the bank's own; the causal effect is a deterministic function of them; SAE Match
    picks each row's cosine-best candidate. `user_pair` adds a pair of non-adjacent SAEs (kind "user")."""
    import h5py
    import numpy as np

    with h5py.File(index_path, "r+") as f:
        infos = {sid: json.loads(g.attrs["info"]) for sid, g in f["saes"].items()}
        pairs = [(sid, i["match_next"], "bank") for sid, i in infos.items() if i.get("match_next")]
        if user_pair:
            pairs.append((*user_pair, "user"))
        for j, (up, down, kind) in enumerate(pairs):
            g = f["saes"][up]
            n = int(infos[up]["n_latents"])
            if kind == "bank":
                cand, cos, corr = g["match_idx"][()], g["match_cos"][()], g["match_corr"][()]
            else:
                cand = np.stack([(np.arange(n) + s) % int(infos[down]["n_latents"]) for s in range(4)], 1)
                cos = np.tile(np.linspace(0.9, 0.3, 4, dtype=np.float32), (n, 1))
                corr = cos * 0.3
            rng = np.random.default_rng(j)
            effect = (np.clip(corr, 0, None) * 0.9 + rng.uniform(0, 0.2, corr.shape)).astype(np.float32)
            effect[cand < 0] = np.nan
            rows = np.arange(n)
            col = np.nanargmax(np.where(cand >= 0, effect, -np.inf), 1)
            best = np.where(effect[rows, col] > 0.2, cand[rows, col], -1).astype(np.int32)

            by_cos, by_corr = (cand[rows, np.argmax(np.where(cand >= 0, s, -np.inf), 1)] for s in (cos, corr))
            saematch = by_cos.astype(np.int32)
            agree = ((by_cos == best) * 1 + (by_corr == best) * 2 + (best >= 0) * 4
                     + (saematch == best) * 8) * (best >= 0)
            m = f.create_group(f"matches/{j}")
            m.attrs.update({"up": up, "down": down, "up_key": infos[up]["cfg"]["in_keys"][0],
                            "down_key": infos[down]["cfg"]["in_keys"][0], "kind": kind,
                            "methods": json.dumps(["cosine", "correlation", "causal", "saematch"])})
            for name, arr in {"cand_idx": cand.astype(np.int32), "cand_cos": cos.astype(np.float32),
                              "cand_corr": corr.astype(np.float32), "cand_effect": effect, "best_idx": best,
                              "best_effect": np.where(best >= 0, effect[rows, col], np.nan).astype(np.float32),
                              "best_corr": corr[rows, col].astype(np.float32),
                              "best_cos": cos[rows, col].astype(np.float32), "saematch_idx": saematch,
                              "saematch_score": cos[rows, 0].astype(np.float32),
                              "agree": agree.astype(np.uint8)}.items():
                m.create_dataset(name, data=arr)
