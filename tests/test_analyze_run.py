"""`strata analyze` on the real chain: tiny random-weight Llama -> harvest -> train -> analyze, and the index
checked against a brute-force recomputation from the run's shards, model and SAEs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from activations import layout
from activations.reader import open_run
from sae.analysis.index_file import FeatureIndex
from sae.checkpoint import load_saes
from strata.cli import main


@pytest.fixture(scope="module")
def bank(analyzed_run):
    return FeatureIndex(layout.index_path(analyzed_run, "topk-layer"))


def heldout_codes(run_dir, sae, key):
    run = open_run(run_dir)
    _, held = run.split(0.1)
    shards = {s.index: s for s in run.manifest.shards}
    rows = np.concatenate([np.arange(shards[i].token_start, shards[i].token_start + shards[i].rows) for i in held])
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(run.read_rows(key, rows)), key=key).numpy()
    # the SAEs were trained without the first position of each context (TrainConfig.exclude_first = 1):
    # the index never counts a firing there
    codes[rows % run.manifest.context_length < 1] = 0
    return run, rows, codes


def test_index_matches_brute_force_on_heldout_shard(analyzed_run, bank):
    saes = load_saes(analyzed_run, "topk-layer")
    assert set(bank.sae_ids) == set(saes)
    sid = sorted(saes)[1]
    key = saes[sid].cfg.in_keys[0]
    run, rows, codes = heldout_codes(analyzed_run, saes[sid], key)
    rec_count = bank.column(sid, "count")
    assert bank.info(sid)["vectors"] == len(rows) == bank.meta["tokens"]
    np.testing.assert_array_equal(rec_count, (codes > 0).sum(0))
    np.testing.assert_allclose(bank.column(sid, "max_act"), codes.max(0), rtol=1e-5)
    top_row = bank.column(sid, "top_row")[:, 0]
    alive = codes.max(0) > 0
    np.testing.assert_array_equal(top_row[alive], rows[codes.argmax(0)][alive])
    # the window is centred on the peak token, read back from the run's token shards
    f = int(np.nonzero(alive)[0][0])
    rec = bank.feature(sid, f)
    W = rec["top_tokens"].shape[1] // 2
    for r, toks in zip(rec["top_row"], rec["top_tokens"]):
        if r >= 0:
            assert toks[W] == run.read_tokens(int(r), int(r) + 1)["token_ids"][0]
    # L0 on the held-out shard = the SAE's k
    assert bank.column(sid, "frequency").sum() == pytest.approx((codes > 0).sum(1).mean(), rel=1e-6)


def test_logit_effects_and_vocab_come_from_the_model(analyzed_run, bank):
    from activations.hooks import unembedding
    from activations.model import load_model

    lm = load_model(open_run(analyzed_run).manifest.model["id"], device="cpu")
    assert len(bank.vocab) == len(lm.tokenizer)
    norm, W_U = unembedding(lm.model)
    sid = "resid.3"  # the last residual layer: closest to the unembedding
    sae = load_saes(analyzed_run, "topk-layer")[sid]
    with torch.no_grad():
        d = sae.W_dec[:3].float()
        logits = (norm(d) - norm(torch.zeros(1, d.shape[1]))) @ W_U.T.float()
    for f in range(3):
        rec = bank.feature(sid, f)
        np.testing.assert_array_equal(rec["logit_top_ids"], torch.topk(logits[f], 10).indices.numpy())
        np.testing.assert_array_equal(rec["logit_bottom_ids"], torch.topk(logits[f], 10, largest=False).indices.numpy())


def test_depth_items_of_a_bank_and_a_multilayer_sae(analyzed_run, bank):
    # per-layer bank: matches chained into paths, residual similarity of adjacent resid layers
    assert [bank.info(s).get("match_next") for s in ["resid.0", "resid.1", "resid.2"]] == ["resid.1", "resid.2", "resid.3"]
    assert bank.paths and bank.paths[0]["saes"] == ["resid.0", "resid.1", "resid.2", "resid.3"]
    corr = bank.column("resid.0", "match_corr")
    assert np.isfinite(corr).all() and (np.abs(corr) <= 1 + 1e-5).all()
    assert [(r["a"], r["b"]) for r in bank.residual_similarity] == [("resid.0", "resid.1"), ("resid.1", "resid.2"),
                                                                   ("resid.2", "resid.3")]
    multi = FeatureIndex(layout.index_path(analyzed_run, "topk-multilayer"))
    (sid,) = multi.sae_ids
    mass = multi.column(sid, "layer_mass")
    assert mass.shape[1] == 4
    alive = multi.column(sid, "count") > 0
    np.testing.assert_allclose(mass[alive].sum(1), 1.0, atol=1e-5)
    ml = multi.column(sid, "mean_layer")[alive]
    assert (ml >= 0).all() and (ml <= 3).all()
    assert multi.info(sid)["vectors"] == 4 * multi.meta["tokens"]


def test_explanations_are_scored(bank):
    expl = bank.column("resid.1", "explanation")
    score = bank.column("resid.1", "explanation_score")
    fired = bank.column("resid.1", "count") > 0
    assert all(e.startswith("fires on ") for e in expl[fired])
    s = score[fired & np.isfinite(score)]
    assert len(s) and ((s >= 0) & (s <= 1)).all()


def test_cli_analyze_errors_are_one_line(analyzed_run, capsys):
    assert main(["analyze", str(analyzed_run), "--name", "nope", "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint for training run 'nope'" in err
    assert main(["analyze", str(analyzed_run), "--data", "some"]) == 2


def test_crosscoder_and_transcoder_runs_are_indexed(analyzed_run, tmp_path):
    import shutil

    from sae.analysis.analyze import AnalyzeConfig, analyze
    from sae.train import train
    from sae.train_config import TrainConfig

    run = tmp_path / "run"  # a copy: the shared analysed run keeps exactly its two training runs
    shutil.copytree(analyzed_run, run, ignore=shutil.ignore_patterns("train", "index", "share"))
    for mode in ("crosscoder", "transcoder"):
        train(TrainConfig(run_dir=str(run), name=f"t-{mode}", mode=mode, layers="1-2", expansion=2, k=4,
                          batch_size=256, max_tokens=1024, progress=False, wandb_mode="disabled", device="cpu"))
        (path,) = analyze(AnalyzeConfig(run_dir=str(run), name=f"t-{mode}", progress=False, device="cpu",
                                        explainer="none"))
        idx = FeatureIndex(path)
        for sid in idx.sae_ids:
            info = idx.info(sid)
            assert info["mode"] == mode and idx.column(sid, "count").sum() > 0
            if mode == "crosscoder":  # decoder norm per output layer, and the slot is the concatenation
                assert idx.column(sid, "decoder_layer_norm").shape[1] == len(info["cfg"]["out_keys"]) == 2
                assert info["slots"] == [info["cfg"]["in_keys"]]
            else:  # transcoders write mlp_out: logit effects apply
                assert idx.has(sid, "logit_top_ids") and not idx.has(sid, "explanation")
