"""`strata synth`: a run made of known features across depth, and `strata eval --suite truth` scoring against it."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from activations import layout
from activations.errors import StrataError
from activations.reader import open_run
from activations.synth import SynthConfig, is_synthetic, load_truth, shard_codes
from activations.verify import verify_run
from strata.cli import main

SMALL = ["--layers", "3", "--d-model", "16", "--features", "32", "--active", "3", "--tokens", "1024",
         "--context", "32", "--shard-tokens", "512", "--sites", "resid,mlp_in,mlp_out"]


def strata(*args) -> int:
    return main([str(a) for a in args])


def tree_hashes(run) -> dict:
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and ".lock" not in p.name}


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    run = tmp_path_factory.mktemp("synth") / "small"
    assert strata("synth", run, *SMALL, "--split", "0.1", "--merge", "0.1", "--rotate", "0.1") == 0
    return run


def test_synth_writes_a_normal_run_with_its_lineage(small_synth):
    run = small_synth
    store = open_run(run)
    m = store.manifest
    assert is_synthetic(m.model) and m.complete and verify_run(run) == []
    assert m.n_tokens == 1024 and len(m.shards) == 2 and m.n_layers == 3
    assert m.keys == ["resid.0", "mlp_in.0", "mlp_out.0", "resid.1", "mlp_in.1", "mlp_out.1",
                      "resid.2", "mlp_in.2", "mlp_out.2", "resid.3"]

    truth = load_truth(run)
    lin = truth.lineage
    kinds = {e["kind"] for e in lin.edges}
    assert {"persist", "rotate", "split", "merge"} <= kinds
    assert any(f.origin == "appear" for f in lin.features) and any(f.last < 3 for f in lin.features)

    # the record round-trips: every edge joins a feature live at L-1 to one live at L, and the directions agree
    for e in lin.edges:
        parent, child = lin.features[e["parent"]], lin.features[e["child"]]
        assert parent.live(e["layer"] - 1) and child.live(e["layer"])
        cos = float(lin.directions[e["layer"] - 1][parent.id] @ lin.directions[e["layer"]][child.id])
        if e["kind"] == "persist":
            assert cos > 0.99
        elif e["kind"] == "rotate":
            assert cos == pytest.approx(0.5, abs=1e-4)
        elif e["kind"] == "split":
            assert cos == pytest.approx(0.7, abs=1e-4)
    for f in lin.features:  # a feature links to itself at every layer of its life, and not past it
        selfs = {e["layer"] for e in lin.edges if e["parent"] == f.id and e["child"] == f.id}
        assert selfs == set(range(f.born + 1, f.last + 1))

    # the shards hold what the truth says: resid.L = codes of the live features x their directions + noise
    codes = shard_codes(SynthConfig(**{k: v for k, v in truth.config.items() if k != "synth"}), lin, 0, 512)
    for key in ("resid.2", "mlp_out.1"):
        ids, dirs = truth.key_features(key)
        x = store.read_block(key, 0, 0, 512)
        resid = x - codes[:, ids] @ dirs
        assert float(np.sqrt((resid ** 2).mean())) < 0.06  # noise 0.05 and float16 rounding
    # supports follow the lineage: split children partition the parent's tokens, merge children take the union
    for f in lin.features:
        if f.origin == "split":
            sibling = next(g for g in lin.features if g.split_event == f.split_event and g.id != f.id)
            both = (codes[:, f.id] > 0) | (codes[:, sibling.id] > 0)
            assert np.array_equal(both, codes[:, f.parents[0]] > 0)
            assert not ((codes[:, f.id] > 0) & (codes[:, sibling.id] > 0)).any()
        if f.origin == "merge":
            assert np.array_equal(codes[:, f.id] > 0, (codes[:, f.parents] > 0).any(1))
    assert np.array_equal(store.read_block("mlp_in.1", 1, 0, 512), store.read_block("resid.1", 1, 0, 512))


def test_synth_is_deterministic_and_resumes_byte_identical(small_synth, tmp_path):
    again = tmp_path / "again"
    assert strata("synth", again, *SMALL, "--split", "0.1", "--merge", "0.1", "--rotate", "0.1") == 0
    want = tree_hashes(small_synth)
    assert tree_hashes(again) == want
    # a lost shard file and a damaged one are re-created by --resume, byte-identical
    (again / "acts" / "resid.2" / "shard-00001.h5").unlink()
    with open(again / "acts" / "mlp_out.0" / "shard-00000.h5", "r+b") as f:
        f.seek(4000)
        f.write(b"\0" * 64)
    assert verify_run(again)
    assert strata("synth", again, *SMALL, "--split", "0.1", "--merge", "0.1", "--rotate", "0.1", "--resume") == 0
    assert tree_hashes(again) == want and verify_run(again) == []
    # the repair command the readers print for a damaged synthetic run is this one
    from activations.verify import repair_command

    assert repair_command(again).startswith(f"strata synth {again} --layers 3 ")
    assert repair_command(again).endswith("--resume")

    # a lost record is named with its repair, which restores it
    shutil.rmtree(again / "synth")
    with pytest.raises(StrataError, match="record .* is missing; re-create it with `strata synth .* --resume`"):
        load_truth(again)
    assert strata("synth", again, *SMALL, "--split", "0.1", "--merge", "0.1", "--rotate", "0.1", "--resume") == 0
    assert tree_hashes(again) == want

    other = tmp_path / "other"
    shutil.copytree(small_synth, other)
    assert strata("synth", other, *SMALL, "--seed", "1", "--overwrite") == 0
    assert tree_hashes(other)["synth/truth.json"] != want["synth/truth.json"]
    assert layout.manifest_path(other).is_file() and load_truth(other).config["seed"] == 1


# ---------------------------------------------------------------- the truth suite
FAST = ["--batch-size", "256", "--k", "3", "--progress", "false", "--device", "cpu"]


def make_perfect(run, name: str) -> dict:
    """Replace every SAE of train/<name> by the true dictionary of its key (extra latents repeat true features;
    encoder = decoder transposed, no biases): what a perfect SAE would have learned. Returns {sid: true ids}."""
    import torch
    from safetensors.torch import load_file, save_file

    truth = load_truth(run)
    folder = layout.checkpoint_dir(run, name) / "saes"
    placed = {}
    for sae_dir in sorted(folder.iterdir()):
        w = load_file(str(sae_dir / "sae.safetensors"))
        ids, dirs = truth.key_features(sae_dir.name)
        n = w["W_dec"].shape[0]
        rows = torch.from_numpy(dirs[np.arange(n) % len(ids)]).float()
        w["W_dec"], w["W_enc"] = rows.clone(), rows.t().contiguous()
        w["b_enc"], w["b_dec"] = torch.zeros_like(w["b_enc"]), torch.zeros_like(w["b_dec"])
        save_file(w, str(sae_dir / "sae.safetensors"))
        placed[sae_dir.name] = ids
    return placed


@pytest.fixture(scope="module")
def perfect_bank(small_synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("perfect") / "run"
    shutil.copytree(small_synth, run)
    assert strata("train", run, "--name", "bank", "--sites", "resid", "--n-latents", "40", "--max-tokens", "512",
                  *FAST) == 0
    make_perfect(run, "bank")
    return run


def read_eval(run, name):
    import json

    return json.loads((layout.train_dir(run, name) / "eval.json").read_text())


def test_a_perfect_dictionary_scores_one(perfect_bank, capsys):
    assert strata("eval", perfect_bank, "--name", "bank", "--suite", "truth", "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "truth: truth_f1 1.000" in out and "strata analyze" in out  # no index yet: matching says what to run
    result = read_eval(perfect_bank, "bank")
    assert result["suites"]["truth"]["status"] == "ok"
    for sid in ("resid.0", "resid.1", "resid.2", "resid.3"):
        o = result["saes"][sid]["overall"]
        assert o["truth_mmcs"] == pytest.approx(1.0, abs=1e-6)
        assert o["truth_recall"] == o["truth_precision"] == o["truth_f1"] == 1.0
    assert "strata analyze" in result["suites"]["truth"]["details"]["matching"]


def test_a_random_dictionary_scores_low(small_synth, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_synth, run)
    assert strata("train", run, "--name", "rand", "--sites", "resid", "--layers", "1", "--n-latents", "40",
                  "--max-tokens", "256", "--lr", "1e-12", *FAST) == 0
    assert strata("eval", run, "--name", "rand", "--suite", "truth", "--device", "cpu") == 0
    o = read_eval(run, "rand")["saes"]["resid.1"]["overall"]
    assert o["truth_mmcs"] < 0.8 and o["truth_f1"] == 0.0


def add_match_group(index, truth, up: str, down: str, maps: dict):
    """Write matches/0 into a feature index as `strata analyze` writes it (the matches contract): `causal` links
    every upstream latent to a latent of its feature's first child in the lineage; `saematch` sends them all to
    latent 0; `cosine` ranks the causal pick second behind latent 1."""
    import json

    import h5py

    L = truth.key_layer(down)
    first_child = {}
    for p, c in sorted(truth.lineage.links(L)):
        first_child.setdefault(p, c)
    down_ids = list(maps[down])
    best = np.array([down_ids.index(first_child[f]) if f in first_child else -1 for f in maps[up]], dtype=np.int32)
    n = len(best)
    cand = np.stack([np.ones(n), np.maximum(best, 0)], 1).astype(np.int32)
    with h5py.File(index, "a") as f:
        if "matches" in f:  # the matches `strata analyze` wrote: replaced by this one group
            del f["matches"]
        g = f.create_group("matches/0")
        g.attrs.update({"up": up, "down": down, "up_key": up, "down_key": down, "kind": "bank",
                        "methods": json.dumps(["cosine", "causal", "saematch"])})
        g["cand_idx"], g["cand_cos"] = cand, np.tile(np.float32([0.9, 0.5]), (n, 1))
        g["best_idx"], g["saematch_idx"] = best, np.zeros(n, dtype=np.int32)
    return best


@pytest.fixture(scope="module")
def analyzed_perfect(perfect_bank, tmp_path_factory):
    run = tmp_path_factory.mktemp("analyzed") / "run"
    shutil.copytree(perfect_bank, run, ignore=shutil.ignore_patterns("eval.json"))
    assert strata("analyze", run, "--name", "bank", "--device", "cpu") == 0
    return run


def test_matches_in_the_index_are_scored_against_the_lineage(analyzed_perfect, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(analyzed_perfect, run)
    truth = load_truth(run)
    # today's matches (best_next_idx of each bank SAE): correlation across shared supports finds the lineage
    assert strata("eval", run, "--name", "bank", "--suite", "truth", "--device", "cpu") == 0
    best_next = read_eval(run, "bank")["suites"]["truth"]["details"]["matching"]["best_next"]
    assert best_next["precision"] >= 0.9 and best_next["recall"] >= 0.85 and best_next["links"] == 3 * 40

    # a matches/<j> group as the causal matcher writes it: each method's top pick is scored on its own
    maps = {k: truth.key_features(k)[0][np.arange(40) % 32] for k in ("resid.1", "resid.2")}
    add_match_group(layout.index_path(run, "bank"), truth, "resid.1", "resid.2", maps)
    assert strata("eval", run, "--name", "bank", "--suite", "truth", "--device", "cpu") == 0
    result = read_eval(run, "bank")
    matching = result["suites"]["truth"]["details"]["matching"]
    edges = truth.lineage.links(2)
    splits = {p for p, c in edges if p != c and sum(q == p for q, _ in edges) == 2}
    assert matching["causal"]["precision"] == 1.0
    assert matching["causal"]["recall"] == pytest.approx(1 - len(splits) / len(edges))  # one child of each split
    assert matching["saematch"]["precision"] < 0.2 and matching["cosine"]["precision"] < 0.2
    assert result["saes"]["resid.1"]["overall"]["truth_match_causal_precision"] == 1.0


# ---------------------------------------------------------------- browsing a synthetic run
def test_dashboard_browses_a_synthetic_run_without_a_model(analyzed_perfect, monkeypatch):
    from test_dashboard_pages import app

    at = app(analyzed_perfect, monkeypatch, page="prompt", train="bank")
    assert any("synthetic" in i.value and "no model" in i.value for i in at.info)
    assert not at.button  # nothing offers to load a model
    at = app(analyzed_perfect, monkeypatch, page="features", train="bank", sae="resid.2", f="5")
    assert any(h.value == "resid.2 · feature 5" for h in at.subheader)
    assert 'class="tok' in "\n".join(m.value for m in at.markdown)  # its top contexts, tokens shown as ids


def test_browser_prompt_page_of_a_synthetic_run_says_there_is_no_model(analyzed_perfect, page):
    from test_dashboard_support import chromium_path, dashboard_server

    if chromium_path() is None:
        pytest.skip("no chromium")
    with dashboard_server(analyzed_perfect, read_only=False) as url:
        page.set_default_timeout(90_000)
        page.goto(f"{url}/?page=prompt&train=bank")
        note = page.get_by_text("there is no model to run typed text through")
        note.wait_for()
        assert note.is_visible() and page.get_by_role("button", name="Run").count() == 0
