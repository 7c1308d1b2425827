"""The analysis pass checked against brute force: build every SAE's full tokens x features code matrix for a
small synthetic stream (what the pass must never do at scale) and compare each index field with it."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae.analysis.indexer import IndexerSettings
from sae.analysis.source import array_blocks
from sae.analysis.stream import index_saes


class TinyTopK:
    """Enough of the SAE loader contract (cfg, encode, W_dec) for the pass; weights random."""

    def __init__(self, d, n, k, keys, mode="layer", seed=0, W_dec=None):
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(d * (len(keys) if mode == "crosscoder" else 1), n, generator=g)
        self.b = torch.randn(n, generator=g) * 0.1
        self.W_dec = W_dec if W_dec is not None else torch.randn(n, d, generator=g)
        self.k = k
        self.cfg = SimpleNamespace(n_latents=n, k=k, mode=mode, in_keys=list(keys), out_keys=list(keys), d_out=d,
                                   layers=[int(x.rsplit(".", 1)[1]) for x in keys], arch="topk")

    def encode(self, x, key=None):
        pre = torch.relu(x @ self.W_enc + self.b)
        top = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter(1, top.indices, top.values)


T, D, N_FEAT, K = 1500, 16, 48, 4
WINDOW = 3


@pytest.fixture(scope="module")
def stream():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(T, D, generator=g)
    acts = {f"resid.{i}": base + 0.3 * i * torch.randn(T, D, generator=g) for i in range(3)}
    token_ids = torch.randint(0, 50, (T,), generator=g)
    doc_ids = torch.repeat_interleave(torch.arange(T // 50), 50)  # documents of 50 tokens
    context_ids = torch.arange(T) // 64  # model contexts of 64 tokens cut across documents
    return acts, token_ids, doc_ids, context_ids


def run_pass(saes, stream, batch=256, residual_pairs=()):
    acts, tok, doc, ctx = stream
    settings = IndexerSettings(top_k=6, window=WINDOW, sample_size=20, intervals=4, per_interval=3, negatives=16)
    blocks = array_blocks(acts, tok, doc, ctx, batch=batch, margin=WINDOW, device="cpu")
    return index_saes(saes, blocks, settings, "cpu", residual_pairs=residual_pairs, n_neighbours=5,
                      match_candidates=4, min_link=0.0)


def test_layer_sae_fields_match_brute_force(stream):
    acts, tok, doc, ctx = stream
    sae = TinyTopK(D, N_FEAT, K, ["resid.1"], seed=3)
    r = run_pass({"a": sae}, stream)["saes"]["a"]
    F = sae.encode(acts["resid.1"]).numpy()  # brute force: the full code matrix

    assert r["vectors"] == T
    np.testing.assert_array_equal(r["count"].numpy(), (F > 0).sum(0))
    np.testing.assert_allclose(r["max_act"].numpy(), F.max(0), rtol=1e-6)
    fired = (F > 0).sum(0)
    np.testing.assert_allclose(r["mean_act"].numpy(), np.where(fired > 0, F.sum(0) / np.maximum(fired, 1), 0), rtol=1e-5)
    np.testing.assert_allclose(r["frequency"].numpy(), fired / T)

    for f in range(N_FEAT):
        col = F[:, f]
        nz = col[col > 0]
        # histogram: 50 bins over [0, hi], hi a power of two >= the max
        hi = float(r["hist_hi"][f])
        if len(nz):
            assert hi >= nz.max() and hi < 2 * nz.max() + 1e-12 and np.log2(hi) == round(np.log2(hi))
            expect, _ = np.histogram(nz.astype(np.float64), bins=50, range=(0, hi))
            np.testing.assert_array_equal(r["hist_counts"][f].numpy(), expect)
        # top-k: the k largest activations, at their rows, sorted
        order = np.argsort(-col, kind="stable")[:6]
        order = order[col[order] > 0]
        got_rows = r["top_row"][f].numpy()
        np.testing.assert_array_equal(got_rows[:len(order)], order)
        assert (got_rows[len(order):] == -1).all()
        np.testing.assert_allclose(r["top_value"][f, :len(order)].numpy(), col[order], rtol=1e-6)
        # windows: the feature's activation and the token at every position within +-WINDOW, same doc and context
        for slot, row in enumerate(order):
            for o in range(-WINDOW, WINDOW + 1):
                q = row + o
                same = 0 <= q < T and doc[q] == doc[row] and ctx[q] == ctx[row]
                assert r["top_tokens"][f, slot, o + WINDOW] == (tok[q] if same else -1)
                assert r["top_acts"][f, slot, o + WINDOW] == pytest.approx(col[q] if same else 0.0, rel=1e-6)
        # quantile samples: real firings of this feature, highest interval first
        rows = r["sample_row"][f].numpy()
        ok = rows >= 0
        assert ok.sum() == min(len(nz), 12)
        np.testing.assert_allclose(r["sample_value"][f].numpy()[ok], col[rows[ok]], rtol=1e-6)
        vals = r["sample_value"][f].numpy()[ok]
        assert (np.diff(vals) <= 1e-7).all()
        assert (np.diff(r["sample_interval"][f].numpy()[ok]) >= 0).all()

    # neighbours by decoder cosine, self excluded
    W = torch.nn.functional.normalize(sae.W_dec, dim=1)
    cos = (W @ W.T).numpy()
    np.fill_diagonal(cos, -np.inf)
    np.testing.assert_array_equal(r["neighbour_idx"].numpy(), np.argsort(-cos, axis=1, kind="stable")[:, :5])


def test_histogram_survives_range_growth():
    """Values arriving in increasing order force many doublings; counts must equal a one-shot histogram."""
    from sae.analysis.histogram import RunningHistogram

    g = torch.Generator().manual_seed(0)
    vals = torch.rand(4000, generator=g).pow(3) * 100 + 1e-3
    feats = torch.randint(0, 3, (4000,), generator=g)
    h = RunningHistogram(3, 50, "cpu")
    for chunk in torch.argsort(vals).split(97):  # ascending: the range keeps growing
        h.add(feats[chunk], vals[chunk])
    for f in range(3):
        v = vals[feats == f].double().numpy()
        expect, _ = np.histogram(v, bins=50, range=(0, float(h.hi[f])))
        np.testing.assert_array_equal(h.counts[f].numpy(), expect)
        assert h.counts[f].sum() == len(v)


def test_multilayer_layer_profile(stream):
    acts, *_ = stream
    keys = ["resid.0", "resid.1", "resid.2"]
    sae = TinyTopK(D, N_FEAT, K, keys, mode="multilayer", seed=5)
    r = run_pass({"ml": sae}, stream)["saes"]["ml"]
    codes = np.stack([sae.encode(acts[k]).numpy() for k in keys], 1)  # [T, L, n]
    np.testing.assert_array_equal(r["layer_count"].numpy(), (codes > 0).sum(0).T)
    mass = codes.sum(0).T  # [n, L]
    p = mass / np.maximum(mass.sum(1, keepdims=True), 1e-30)
    np.testing.assert_allclose(r["layer_mass"].numpy(), p, atol=1e-6)
    alive = mass.sum(1) > 0
    np.testing.assert_allclose(r["mean_layer"].numpy()[alive], (p * np.array([0, 1, 2])).sum(1)[alive], atol=1e-5)
    ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(1)
    np.testing.assert_allclose(r["layer_entropy"].numpy(), ent, atol=1e-5)
    np.testing.assert_array_equal(r["n_layers_active"].numpy(), ((codes > 0).sum(0) > 0).sum(0))
    assert r["vectors"] == 3 * T
    # top examples remember which layer fired: the value at (row, slot) is the code there
    row, slot, val = r["top_row"][:, 0], r["top_slot"][:, 0], r["top_value"][:, 0]
    ok = row >= 0
    np.testing.assert_allclose(codes[row[ok].numpy(), slot[ok].numpy(), np.arange(N_FEAT)[ok.numpy()]], val[ok].numpy(), rtol=1e-6)
    assert val[ok].numpy() == pytest.approx(codes.max((0, 1))[ok.numpy()], rel=1e-6)


def test_bank_matches_correlation_and_paths(stream):
    acts, *_ = stream
    keys = ["resid.0", "resid.1", "resid.2"]
    shared = torch.randn(N_FEAT, D, generator=torch.Generator().manual_seed(9))
    saes = {f"l{i}": TinyTopK(D, N_FEAT, K, [k], seed=10 + i, W_dec=shared + 0.1 * i) for i, k in enumerate(keys)}
    res = run_pass(saes, stream, batch=200, residual_pairs=[("resid.0", "resid.1"), ("resid.1", "resid.2")])
    F = {sid: s.encode(acts[s.cfg.in_keys[0]]).numpy() for sid, s in saes.items()}
    for a, b in (("l0", "l1"), ("l1", "l2")):
        r = res["saes"][a]
        assert r["match_next"] == b
        idx, corr = r["match_idx"].numpy(), r["match_corr"].numpy()
        for i in range(N_FEAT):
            for c in range(idx.shape[1]):
                x, y = F[a][:, i], F[b][:, idx[i, c]]
                expect = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else 0.0
                assert corr[i, c] == pytest.approx(expect, abs=1e-4)
        # candidates are the most similar decoder directions
        wa = torch.nn.functional.normalize(saes[a].W_dec, dim=1)
        wb = torch.nn.functional.normalize(saes[b].W_dec, dim=1)
        np.testing.assert_allclose(r["match_cos"].numpy(), torch.topk(wa @ wb.T, 4, dim=1).values.numpy(), atol=1e-5)
        assert (r["best_next_corr"].numpy() >= corr.max(1) - 1e-6).all()
    # paths follow best links: consecutive entries are best matches
    p = res["paths"][0]
    assert p["saes"] == ["l0", "l1", "l2"] and len(p["features"]) > 0
    for row in p["features"].tolist():
        for i in range(2):
            if row[i] >= 0 and row[i + 1] >= 0:
                assert res["saes"][f"l{i}"]["best_next_idx"][row[i]] == row[i + 1]
    # residual similarity: mean cosine of centred vectors (centre from the first block)
    rs = {(x["a"], x["b"]): x for x in res["residual_similarity"]}
    x0, x1 = acts["resid.0"].numpy(), acts["resid.1"].numpy()
    raw = (x0 * x1).sum(1) / np.linalg.norm(x0, axis=1) / np.linalg.norm(x1, axis=1)
    assert rs[("resid.0", "resid.1")]["cos_raw"] == pytest.approx(raw.mean(), abs=1e-5)
    assert 0 < rs[("resid.0", "resid.1")]["cos_centred"] <= 1


def test_pair_correlation_chunking_is_exact(monkeypatch):
    """Tiny chunk limit: the row-chunked pair expansion must give the same xy sums."""
    from sae.analysis import similarity

    g = torch.Generator().manual_seed(0)
    A = torch.relu(torch.randn(300, 20, generator=g) - 1)
    B = torch.relu(torch.randn(300, 30, generator=g) - 1)
    ai = torch.arange(20).unsqueeze(1).expand(20, 5)
    bi = torch.stack([torch.randperm(30, generator=g)[:5] for _ in range(20)])  # distinct per row, like top-k
    def sp(M):
        return (*M.nonzero(as_tuple=True), M[M > 0])
    expect = (A[:, ai.flatten()] * B[:, bi.flatten()]).sum(0).view(20, 5).double()
    for limit in (1 << 22, 7):
        monkeypatch.setattr(similarity, "MAX_PAIRS_PER_CHUNK", limit)
        pc = similarity.PairCorrelation(ai, bi, 30)
        for s in range(0, 300, 128):
            a, b = A[s:s + 128], B[s:s + 128]
            pc.add(sp(a), sp(b), len(a))
        torch.testing.assert_close(pc.xy_sums(), expect, atol=1e-4, rtol=1e-5)
