"""Matches across depth you can trust: the causal check against analytic and brute-force values, the four
methods (cosine, correlation, causal, SAE Match) on a run with planted lineages, and what `strata analyze`
writes into the index (matches/<j>, paths chained by causal effect, cross-site and user pairs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from activations import layout
from sae.analysis import depth
from sae.analysis.causal import LinearSpan, ModelSpan, causal_effects, truth_span
from sae.analysis.index_file import FeatureIndex
from sae.analysis.indexer import IndexerSettings
from sae.analysis.saematch import sae_match
from sae.analysis.source import array_blocks
from sae.analysis.stream import index_saes
from sae.config import SAEConfig
from sae.models import build_sae


def relu_sae(dec_nd: torch.Tensor, enc_dn: torch.Tensor, key: str, b_enc=None, scale: float = 1.0, arch="relu"):
    """A ReLU SAE with the given decoder rows and encoder columns (raw units: normalisation scalar `scale`)."""
    n, d = dec_nd.shape
    cfg = SAEConfig(arch=arch, d_in=d, d_out=d, n_latents=n, k=None, in_keys=[key], out_keys=[key],
                    in_scales=[scale], out_scales=[scale], apply_b_dec_to_input=False, normalize_decoder=False)
    sae = build_sae(cfg).eval()
    with torch.no_grad():
        sae.W_dec.copy_(dec_nd * scale)  # decode divides by the scale: raw decoder rows = dec_nd
        sae.W_enc.copy_(enc_dn / scale)  # encode multiplies by it: raw encoder = enc_dn
        sae.b_enc.copy_(b_enc if b_enc is not None else torch.zeros(n))
        sae.b_dec.zero_()
    return sae


def as_contexts(acts: dict, T: int):
    """In-memory activations [N, d] per key -> one batch of (ids, {key: [C, T, d]}) for causal_effects."""
    N = next(iter(acts.values())).shape[0]
    return [(torch.zeros((N // T, T), dtype=torch.long), {k: v.reshape(N // T, T, -1) for k, v in acts.items()})]


# ---------------------------------------------------------------- the causal check on a linear toy
def test_ablation_effect_equals_the_analytic_effect_on_a_linear_toy():
    """x_b = x_a M; the downstream SAE stays in its linear regime (large positive bias), so removing
    a_i * d_i at a position lowers b_j there by exactly a_i (d_i M) . e_j. Every firing is measured once
    (rounds >= active features per position), so the effect is that drop summed over i's firings, over
    b_j summed there."""
    g = torch.Generator().manual_seed(0)
    d, n_a, n_b, N, T = 12, 10, 9, 600, 20
    dec_a = torch.randn(n_a, d, generator=g)
    enc_a = torch.randn(d, n_a, generator=g)
    up = relu_sae(dec_a, enc_a, "resid.1", b_enc=-2.0 * torch.ones(n_a), scale=2.5)  # sparse: ~ a third fire
    M = torch.randn(d, d, generator=g) / d ** 0.5
    enc_b = torch.randn(d, n_b, generator=g) * 0.05
    down = relu_sae(torch.randn(n_b, d, generator=g), enc_b, "resid.2", b_enc=50.0 * torch.ones(n_b))
    x_a = torch.randn(N, d, generator=g) * 1.5
    cand = torch.stack([torch.randperm(n_b, generator=g)[:4] for _ in range(n_a)])

    with torch.no_grad():
        codes_a = up.encode(x_a).numpy()
        b_clean = down.encode(x_a @ M).numpy()
    assert 0 < (codes_a > 0).mean() < 0.7 and (b_clean > 0).all()
    effect, measured = causal_effects(up, down, LinearSpan(M), as_contexts({"resid.1": x_a}, T), cand,
                                      rounds=n_a)

    fires = codes_a > 0
    np.testing.assert_array_equal(measured.numpy(), fires.sum(0))  # every firing ablated exactly once
    unit_drop = (dec_a @ M @ enc_b).numpy()  # [n_a, n_b]: drop of b_j per unit of a_i
    for i in range(n_a):
        for c, j in enumerate(cand[i].tolist()):
            expect = codes_a[fires[:, i], i].sum() * unit_drop[i, j] / b_clean[fires[:, i], j].sum()
            assert effect[i, c].item() == pytest.approx(expect, rel=1e-3, abs=1e-5)


# ---------------------------------------------------------------- planted lineages: all four methods
def planted_run(seed: int = 0):
    """Two layers of known features and the known linear map between them (x_1 = x_0 M + newborn features).

    Upstream features (64): 16 copied (same direction downstream), 16 rotated (child at cosine ~0.5), 6 of
    the rotated with a decoy (a newborn downstream feature at cosine ~0.9 that fires on its own), 8 split
    into two children, 4 pairs that always fire together (the child of each is closer, by decoder
    cosine, to the other's parent), 8 that die. True links: parent -> its children."""
    g = torch.Generator().manual_seed(seed)
    d, n_up, N = 128, 64, 8000
    F = torch.nn.functional.normalize(torch.randn(n_up, d, generator=g), dim=1)

    def unit(v):
        return torch.nn.functional.normalize(v, dim=0)

    def rotated(f, cos):
        r = unit(torch.randn(d, generator=g))
        r = unit(r - (r @ f) * f)
        return cos * f + (1 - cos ** 2) ** 0.5 * r

    G, T, truth, born = [], [], {}, []  # T: (parent, child, weight) of the map
    def child(vec, parent=None, w=1.0):
        G.append(vec)
        if parent is not None:
            T.append((parent, len(G) - 1, w))
            truth.setdefault(parent, set()).add(len(G) - 1)
        return len(G) - 1

    for i in range(0, 16):
        child(F[i], i)
    for i in range(16, 32):
        child(rotated(F[i], 0.5), i)
        if i < 22:
            born.append(child(unit(rotated(F[i], 0.9))))
    for i in range(32, 40):
        child(rotated(F[i], 0.8), i, 1.0)
        child(rotated(F[i], 0.6), i, 0.8)
    cofire = [(40 + 2 * q, 41 + 2 * q) for q in range(4)]
    for a, b in cofire:
        child(unit(rotated(F[a], 0.45)), a)
        child(unit(0.75 * F[a] + 0.75 * F[b] + 0.2 * unit(torch.randn(d, generator=g))), b)
    # 48-55: die; 56-63: copied too (a second group, so most features have a descendant)
    for i in range(56, 64):
        child(F[i], i)
    for _ in range(4):
        born.append(child(unit(torch.randn(d, generator=g))))
    G = torch.stack([unit(v) for v in G])
    n_down = len(G)

    Tm = torch.zeros(n_up, n_down)
    for p, c, w in T:
        Tm[p, c] = w
    M = torch.linalg.pinv(F) @ Tm @ G  # F M = T G: each parent's direction becomes its children's

    fire = torch.rand(N, n_up, generator=g) < 0.06
    for a, b in cofire:
        fire[:, b] = fire[:, a]
    a_up = fire * (0.5 + 1.5 * torch.rand(N, n_up, generator=g))
    for a, b in cofire:
        a_up[:, b] = a_up[:, a]
    newborn = torch.zeros(N, n_down)
    newborn[:, born] = (torch.rand(N, len(born), generator=g) < 0.06) * (0.5 + 1.5 * torch.rand(N, len(born),
                                                                                                 generator=g))
    x0 = a_up @ F
    x1 = x0 @ M + newborn @ G
    up = relu_sae(F, torch.linalg.pinv(F), "resid.0")
    down = relu_sae(G, torch.linalg.pinv(G), "resid.1")
    return {"x0": x0, "x1": x1, "M": M, "up": up, "down": down, "truth": truth, "n_up": n_up}


def recall_precision(picks: torch.Tensor, truth: dict) -> tuple[float, float]:
    picks = picks.tolist()
    made = [i for i, j in enumerate(picks) if j >= 0]
    right = [i for i in made if j_in(picks[i], truth.get(i))]
    return len(right) / len(truth), (len(right) / len(made) if made else 0.0)


def j_in(j, children):
    return children is not None and j in children


def test_planted_lineages_are_recovered_by_the_causal_check(capsys):
    run = planted_run()
    up, down = run["up"], run["down"]
    acts = {"resid.0": run["x0"], "resid.1": run["x1"]}
    N = len(run["x0"])
    settings = IndexerSettings(top_k=5, window=1, sample_size=10, intervals=2, per_interval=2, negatives=4)
    blocks = array_blocks(acts, torch.zeros(N, dtype=torch.int32), torch.arange(N) // 100, torch.arange(N) // 100,
                          batch=2000, margin=1, device="cpu")
    res = index_saes({"resid.0": up, "resid.1": down}, blocks, settings, "cpu", n_neighbours=2, match_candidates=5)
    (m,) = res["matches"]
    assert (m["up"], m["down"], m["kind"]) == ("resid.0", "resid.1", "bank")
    effect, _ = causal_effects(up, down, LinearSpan(run["M"]), as_contexts({"resid.0": run["x0"]}, 100),
                               m["cand_idx"], rounds=2)
    depth.finish_match(m, effect, sae_match(up, down), min_effect=0.2, min_link=0.3)

    cand, corr = m["cand_idx"].long(), m["cand_corr"]
    corrpick_features = cand.gather(1, (corr + 1e-6 * m["cand_cos"]).argmax(1, keepdim=True)).squeeze(1)
    methods = {
        "cosine": cand[:, 0],  # top decoder cosine
        "correlation": torch.where(corr.max(1).values >= 0.3, corrpick_features, -1),
        "causal": m["best_idx"].long(),
        "saematch": m["saematch_idx"].long(),  # one-to-one assignment: every feature gets a partner
    }
    figures = {k: recall_precision(v, run["truth"]) for k, v in methods.items()}
    with capsys.disabled():
        print("\nplanted lineages (64 upstream features, 56 true links):")
        for k, (r, p) in figures.items():
            print(f"  {k:<12} recall {r:.2f}  precision {p:.2f}")
    r, p = figures["causal"]
    assert r >= 0.9 and p >= 0.9
    # the planted traps do what they are meant to: decoys fool cosine, co-firing pairs fool correlation
    assert figures["cosine"][0] < 0.9 and figures["correlation"][1] < 0.95
    # agreement bits: causal always agrees with itself where it made a pick; cosine never on the decoys
    agree = m["agree"]
    assert ((agree[m["best_idx"] >= 0] & 4) > 0).all()
    assert ((agree[16:22] & 1) == 0).all()
    assert set(m["agreement"]) == {"cosine", "correlation", "causal", "saematch"}


def test_sae_match_undoes_a_permutation_and_a_rescaling():
    """The second SAE is the first with its features permuted, each scaled by its own factor (decoder x s,
    encoder / s) and its input normalised differently: folding recovers the permutation exactly."""
    g = torch.Generator().manual_seed(3)
    n, d = 40, 16
    dec = torch.randn(n, d, generator=g)
    enc = torch.randn(d, n, generator=g)
    perm = torch.randperm(n, generator=g)
    s = 0.5 + torch.rand(n, generator=g) * 2
    a = relu_sae(dec, enc, "resid.1")
    b = relu_sae(dec[perm] * s[:, None], enc[:, perm] / s[None], "resid.2", scale=3.0)
    idx, score = sae_match(a, b)
    inverse = torch.argsort(perm)
    np.testing.assert_array_equal(idx.numpy(), inverse.numpy())
    assert torch.allclose(score, torch.ones(n), atol=1e-4)
    # a narrower downstream SAE: the surplus upstream features stay unassigned
    c = relu_sae(dec[:30], enc[:, :30], "resid.2")
    idx, _ = sae_match(a, c)
    assert (idx[:30] == torch.arange(30, dtype=torch.int32)).all() and (idx[30:] == -1).all()


# ---------------------------------------------------------------- through a real model
def test_model_span_is_the_model_between_two_keys(tiny_llama):
    """ModelSpan(a, b) on the activation at a equals the full forward read at b, with the same change
    spliced in at a (and unchanged when nothing is changed), for resid -> resid and cross-site keys."""
    from activations.hooks import capture, splice
    from activations.model import load_model

    model = load_model(str(tiny_llama), device="cpu").model
    ids = torch.randint(2, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    acts = capture(model, ["resid.1", "resid.2", "mlp_out.1"], ids)
    delta = torch.zeros_like(acts["resid.1"])
    delta[:, 5] = torch.randn(3, acts["resid.1"].shape[-1])
    for a, b in [("resid.1", "resid.2"), ("resid.1", "mlp_out.1"), ("mlp_out.1", "resid.2")]:
        span = ModelSpan(model, a, b)
        torch.testing.assert_close(span(ids, acts[a]), acts[b].float(), rtol=1e-5, atol=1e-5)
        d = delta if a == "resid.1" else delta * 0.1
        with splice(model, a, lambda act, d=d: act - d):
            want = capture(model, [b], ids)[b]
        torch.testing.assert_close(span(ids, acts[a] - d), want.float(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(want[:, 5:], acts[b][:, 5:])  # the change did reach b (and later tokens)
        torch.testing.assert_close(want[:, :5], acts[b][:, :5])  # but not earlier ones


def test_contexts_are_chosen_to_cover_the_features():
    """Budget of 2 of 4 contexts (T = 10): features 0-2 fire only in context 1, 3-4 only in 3, 5 in 0 and 1."""
    from sae.analysis.causal import choose_contexts

    fired = torch.tensor([[12, -1], [15, 19], [11, -1], [33, 31], [35, -1], [4, 17]])
    assert choose_contexts([0, 10, 20, 30], fired, 10, 2) == [10, 30]
    assert choose_contexts([0, 10, 20, 30], fired, 10, 9) == [0, 10, 20, 30]


def test_check_pair_names_what_is_matched():
    from activations.errors import StrataError

    g = torch.Generator().manual_seed(0)
    saes = {"resid.1": relu_sae(torch.randn(8, 4, generator=g), torch.randn(4, 8, generator=g), "resid.1"),
            "resid.2": relu_sae(torch.randn(8, 6, generator=g), torch.randn(6, 8, generator=g), "resid.2")}
    with pytest.raises(StrataError, match="different numbers of latents are fine"):
        depth.match_pairs(saes, [("resid.1", "resid.2")])


@pytest.fixture(scope="module")
def cross_run(tmp_path_factory, tiny_run):
    """A copy of the tiny run with per-layer SAEs on resid.1-2 and mlp_out.1-2, analysed with a user pair."""
    import shutil

    from sae.analysis.analyze import AnalyzeConfig, analyze
    from sae.train import train
    from sae.train_config import TrainConfig

    run = tmp_path_factory.mktemp("cross") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train", "index", "share", ".locks", ".strata.lock"))
    train(TrainConfig(run_dir=str(run), name="x", sites="resid,mlp_out", layers="1-2", expansion=2, k=4,
                      batch_size=256, max_tokens=2048, progress=False, wandb_mode="disabled", device="cpu"))
    (path,) = analyze(AnalyzeConfig(run_dir=str(run), name="x", match="resid.1:mlp_out.2", explainer="none",
                                    progress=False, device="cpu"))
    return run, FeatureIndex(path)


def test_analyze_writes_bank_cross_site_and_user_matches(cross_run):
    _, idx = cross_run
    pairs = {(m["up"], m["down"]): m for m in idx.matches()}
    assert {k: m["kind"] for k, m in pairs.items()} == {
        ("resid.1", "resid.2"): "bank", ("mlp_out.1", "mlp_out.2"): "bank",
        ("resid.1", "mlp_out.1"): "cross-site", ("mlp_out.1", "resid.2"): "cross-site",
        ("resid.2", "mlp_out.2"): "cross-site", ("resid.1", "mlp_out.2"): "user"}
    for m in pairs.values():
        assert m["methods"] == ["cosine", "correlation", "causal", "saematch"]
        assert (m["up_key"], m["down_key"]) == (m["up"], m["down"])
        arr = idx.match_arrays(m["j"])
        n_up = idx.n_latents(m["up"])
        assert arr["cand_idx"].shape == arr["cand_effect"].shape == (n_up, 5)
        assert arr["best_idx"].shape == arr["agree"].shape == arr["saematch_idx"].shape == (n_up,)
        measured = np.isfinite(arr["cand_effect"]).all(1)
        assert measured.mean() > 0.5  # most features fire on the held-out contexts and were ablated
        assert (arr["cand_effect"][measured] <= 1 + 1e-4).all()
        best = (arr["best_idx"] >= 0) & measured
        # the best match is the candidate with the largest effect, and at least min_effect; a feature never
        # ablated falls back to the most correlated candidate
        assert (arr["best_effect"][best] >= 0.2).all()
        never = ~np.isfinite(arr["cand_effect"]).any(1) & (arr["best_idx"] >= 0)
        assert np.isnan(arr["best_effect"][never]).all() and (arr["best_corr"][never] >= 0.3).all()
        np.testing.assert_allclose(arr["best_effect"][best], np.nanmax(arr["cand_effect"][best], axis=1))
        assert ((arr["agree"][best] & 4) > 0).all()
        assert sorted(arr["saematch_idx"]) == list(range(idx.n_latents(m["down"])))  # a permutation (equal widths)


def test_causal_effect_in_the_index_is_the_ablation_through_the_model(cross_run):
    """Recompute one match's effects by hand: encode the held-out contexts, ablate with the same picks,
    run the model's block with hooks (capture/splice), and compare with the stored cand_effect."""
    from activations.hooks import capture, splice
    from activations.model import load_model
    from activations.reader import open_run
    from sae.analysis.analyze import select_spans
    from sae.analysis.causal import context_batches, context_starts, pick_features
    from sae.checkpoint import load_saes

    run_dir, idx = cross_run
    m = next(m for m in idx.matches() if m["kind"] == "bank" and m["up"] == "resid.1")
    arr = idx.match_arrays(m["j"])
    saes = load_saes(run_dir, "x")
    up, down = saes["resid.1"], saes["resid.2"]
    model = load_model(str(open_run(run_dir).manifest.model["id"]), device="cpu").model
    run = open_run(run_dir)
    spans, _ = select_spans(run, "heldout", 0.1)
    cand = torch.from_numpy(arr["cand_idx"]).long()
    drop = torch.zeros(cand.shape, dtype=torch.float64)
    base = torch.zeros(cand.shape, dtype=torch.float64)
    measured = torch.zeros(len(cand), dtype=torch.long)
    with torch.no_grad():
        starts = context_starts(spans, 32)
        assert len(starts) * 32 <= 4096  # within analyze's --causal-tokens: every held-out context is used
        for ids, acts in context_batches(run, starts, ["resid.1"], 1024 // 32, "cpu"):
            C, T, d = acts["resid.1"].shape
            codes = up.encode(acts["resid.1"].reshape(C * T, d)).float()
            codes.view(C, T, -1)[:, :1] = 0  # exclude_first = 1, as trained
            with splice(model, "resid.1", lambda a, x=acts["resid.1"]: x):
                clean = down.encode(capture(model, ["resid.2"], ids)["resid.2"].reshape(C * T, d))
            for _ in range(2):
                pick = pick_features(codes, measured)
                rows = torch.nonzero(pick >= 0).squeeze(1)
                feat = pick[rows]
                delta = torch.zeros(C * T, d)
                unit = up.decode(torch.eye(len(cand))[feat]) - up.decode(torch.zeros(1, len(cand)))
                delta[rows] = codes[rows, feat, None] * unit  # the feature's raw decoder contribution
                ablated = acts["resid.1"] - delta.view(C, T, d)
                with splice(model, "resid.1", lambda a, x=ablated: x):
                    abl = down.encode(capture(model, ["resid.2"], ids)["resid.2"].reshape(C * T, d))
                before, after = clean[rows].gather(1, cand[feat]), abl[rows].gather(1, cand[feat])
                drop.index_add_(0, feat, (before - after).double())
                base.index_add_(0, feat, before.double())
                measured += torch.bincount(feat, minlength=len(measured))
                codes[rows, feat] = 0
    expect = torch.where(base > 0, drop / base.clamp_min(1e-300), torch.zeros_like(drop))
    expect[measured == 0] = float("nan")
    np.testing.assert_allclose(arr["cand_effect"], expect.float().numpy(), rtol=1e-3, atol=1e-4)


def test_paths_chain_by_causal_effect_and_lineage_reads_both_ways(cross_run):
    _, idx = cross_run
    paths = {tuple(p["saes"]): p for p in idx.paths}
    p = paths[("resid.1", "resid.2")]
    assert p["method"] == "causal"
    m = next(m for m in idx.matches() if (m["up"], m["down"]) == ("resid.1", "resid.2"))
    arr = idx.match_arrays(m["j"])
    for (f1, f2), score in zip(p["features"], p["score"]):
        assert arr["best_idx"][f1] == f2 and score == pytest.approx(arr["best_effect"][f1])
    f1, f2 = (int(v) for v in p["features"][0])
    lin = idx.lineage("resid.2", f2)
    assert any(e["sae"] == "resid.1" and e["feature"] == f1 and e["kind"] == "bank" for e in lin["upstream"])
    down = idx.lineage("resid.1", f1, top=50)["downstream"]
    assert {e["sae"] for e in down} == {"resid.2", "mlp_out.1", "mlp_out.2"}
    effects = [e["effect"] for e in down if np.isfinite(e["effect"])]
    assert effects == sorted(effects, reverse=True)
    top = next(e for e in down if e["sae"] == "resid.2" and e["feature"] == f2)
    assert top["agree"] & 4


def test_old_index_without_matches_still_opens(analyzed_run, tmp_path):
    import shutil

    import h5py

    path = tmp_path / "old.h5"
    shutil.copyfile(layout.index_path(analyzed_run, "topk-layer"), path)
    with h5py.File(path, "r+") as f:
        del f["matches"]
        for g in f["paths"].values():
            del g.attrs["method"]
    idx = FeatureIndex(path)
    assert idx.matches() == [] and idx.lineage("resid.1", 0) == {"upstream": [], "downstream": []}
    assert idx.paths and idx.paths[0]["method"] == "correlation"


# ---------------------------------------------------------------- a `strata synth` run (no model: the known map)
def test_synthetic_run_matches_causally_through_its_known_map(tmp_path, capsys):
    """`strata synth` writes layers of known features (persist, rotate, split, merge, vanish, appear). With the
    true dictionaries as SAEs, the causal check through the generator's map (truth_span) recovers the lineage
    links; and `strata analyze` on a trained bank of that run measures causal effects without any model."""
    from activations.reader import open_run
    from activations.synth import load_truth
    from strata.cli import main

    run = tmp_path / "synth"
    assert main(["synth", str(run), "--layers", "2", "--d-model", "32", "--features", "16", "--active", "3",
                 "--tokens", "4096", "--context", "32", "--shard-tokens", "1024", "--sites", "resid", "--split",
                 "0.15", "--merge", "0.15", "--rotate", "0.15", "--vanish", "0.1"]) == 0
    truth = load_truth(run)
    r = open_run(run)
    rows = np.arange(r.n_tokens)
    acts = {k: torch.from_numpy(r.read_rows(k, rows).astype(np.float32)) for k in ("resid.1", "resid.2")}
    ids = {k: truth.key_features(k)[0] for k in acts}
    saes = {k: relu_sae(torch.from_numpy(truth.key_features(k)[1]).float(),
                        torch.linalg.pinv(torch.from_numpy(truth.key_features(k)[1]).float()), k) for k in acts}
    settings = IndexerSettings(top_k=5, window=1, sample_size=10, intervals=2, per_interval=2, negatives=4)
    N = len(rows)
    blocks = array_blocks(acts, torch.zeros(N, dtype=torch.int32), torch.arange(N) // 32, torch.arange(N) // 32,
                          batch=1024, margin=1, device="cpu")
    (m,) = index_saes(saes, blocks, settings, "cpu", n_neighbours=2, match_candidates=5)["matches"]
    span = truth_span(truth, "resid.1", "resid.2")
    assert truth_span(truth, "resid.2", "resid.1") is None  # only downstream resid keys have a known map
    effect, _ = causal_effects(saes["resid.1"], saes["resid.2"], span, as_contexts({"resid.1": acts["resid.1"]}, 32),
                               m["cand_idx"], rounds=3)
    depth.finish_match(m, effect, sae_match(saes["resid.1"], saes["resid.2"]), min_effect=0.2, min_link=0.3)
    children = {}
    for p, c in truth.lineage.links(2):
        children.setdefault(int(np.nonzero(ids["resid.1"] == p)[0][0]), set()).add(
            int(np.nonzero(ids["resid.2"] == c)[0][0]))
    cand, corr = m["cand_idx"].long(), m["cand_corr"]
    corr_pick = cand.gather(1, (corr + 1e-6 * m["cand_cos"]).argmax(1, keepdim=True)).squeeze(1)
    methods = {"cosine": cand[:, 0], "correlation": torch.where(corr.max(1).values >= 0.3, corr_pick, -1),
               "causal": m["best_idx"].long(), "saematch": m["saematch_idx"].long()}
    figures = {k: recall_precision(v, children) for k, v in methods.items()}
    with capsys.disabled():
        print(f"\nstrata synth run, resid.1 -> resid.2 ({len(ids['resid.1'])} features, "
              f"{sum(len(c) for c in children.values())} lineage edges):")
        for k, (rec, prec) in figures.items():
            print(f"  {k:<12} recall {rec:.2f}  precision {prec:.2f}")
    assert figures["causal"][0] >= 0.9 and figures["causal"][1] >= 0.9

    # analyze on a trained bank of the synthetic run: causal effects through the known map, paths by them
    from sae.analysis.analyze import AnalyzeConfig, analyze
    from sae.train import train
    from sae.train_config import TrainConfig

    train(TrainConfig(run_dir=str(run), name="b", sites="resid", layers="0-2", n_latents=24, k=3, batch_size=256,
                      max_tokens=2048, progress=False, wandb_mode="disabled", device="cpu"))
    (path,) = analyze(AnalyzeConfig(run_dir=str(run), name="b", explainer="none", progress=False, device="cpu"))
    idx = FeatureIndex(path)
    assert [m["methods"] for m in idx.matches()] == [["cosine", "correlation", "causal", "saematch"]] * 2
    assert np.isfinite(idx.match_arrays(0)["cand_effect"]).any() and idx.paths[0]["method"] == "causal"
    assert any("known map" in n for n in idx.meta["notes"])
