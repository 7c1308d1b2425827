"""Interventions on the tiny Llama: zeroing or scaling a feature changes the logits exactly as editing the
activation by hand (x + (new - f) * decoder direction, the SAE's error term kept) and re-running the rest of
the model; per-layer SAEs, multi-layer SAEs and transcoders; steering during generation; `strata intervene`."""
from __future__ import annotations

import shutil

import pytest
import torch

from activations.hooks import capture, splice
from activations.model import load_model
from sae.checkpoint import load_saes
from sae.circuits.intervene import Edit, intervene, parse_edits, steer
from strata.cli import main

PROMPT = "The quick brown fox jumps over the lazy dog and the cat"


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return load_model(str(tiny_llama), device="cpu")


@pytest.fixture(scope="module")
def ids(lm):
    return lm.tokenizer(PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def transcoder_run(tmp_path_factory, tiny_run):
    from sae.train import train
    from sae.train_config import TrainConfig

    run = tmp_path_factory.mktemp("tc") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train", "index", "share"))
    train(TrainConfig(run_dir=str(run), name="tc", mode="transcoder", layers="1", expansion=2, k=4, batch_size=256,
                      max_tokens=1024, progress=False, wandb_mode="disabled", device="cpu"))
    return run


def firing(sae, x_Td, key=None):
    """(position, feature, value) of the strongest code in the prompt."""
    f = sae.encode(x_Td.float(), key=key).float()
    pos, feat = divmod(int(f.argmax()), f.shape[1])
    return pos, feat, float(f[pos, feat])


def by_hand(model, ids, key, edited_Td):
    """Logits with the activation at `key` replaced by `edited_Td` (the rest of the model re-run)."""
    with torch.no_grad(), splice(model, key, lambda x: edited_Td[None].to(x.dtype)):
        return model(input_ids=ids, use_cache=False).logits[0].float()


def assert_logits_match(result, model, ids, expected_TV):
    clean_TV = model(input_ids=ids, use_cache=False).logits[0].float()
    p = result["position"]
    assert result["logits"], "some logit must change"
    for row in result["logits"]:
        assert row["clean"] == pytest.approx(float(clean_TV[p, row["id"]]), abs=1e-4)
        assert row["edited"] == pytest.approx(float(expected_TV[p, row["id"]]), abs=1e-4)
    # the rows are the largest changes: no token outside the table moved more than the smallest in it
    delta = (expected_TV[p] - clean_TV[p]).abs()
    assert float(delta.max()) == pytest.approx(abs(result["logits"][0]["delta"]), abs=1e-4)


def test_zeroing_a_layer_sae_feature_matches_the_direct_computation(analyzed_run, lm, ids):
    saes = load_saes(analyzed_run, "topk-layer")
    sae, key = saes["resid.1"], "resid.1"
    x_Td = capture(lm.model, [key], ids)[key][0]
    pos, feat, value = firing(sae, x_Td)
    assert value > 0
    result = intervene(lm.model, lm.tokenizer, saes, ids, [Edit("resid.1", feat, 0.0, pos)], top=5)

    edited = x_Td.clone()
    edited[pos] -= value * sae.W_dec[feat] / sae.out_scale(key)
    assert_logits_match(result, lm.model, ids, by_hand(lm.model, ids, key, edited))
    assert result["edits"][0]["clean_value"] == pytest.approx(value, rel=1e-5)
    # the SAE's error term is kept: the edited activation differs from x only along the feature's direction
    assert torch.allclose((edited - x_Td)[pos].norm(), value * (sae.W_dec[feat] / sae.out_scale(key)).norm())

    # downstream features: only SAEs reading deeper than resid.1 are reported, and something there moved
    # (the edit is at one position; later positions see it through attention)
    if pos < ids.shape[1] - 1:
        assert result["features"] and all(r["sae"] in ("resid.2", "resid.3") for r in result["features"])
        deeper = saes["resid.3"]
        clean3 = capture(lm.model, ["resid.3"], ids)["resid.3"][0]
        with torch.no_grad(), splice(lm.model, key, lambda x: edited[None]):
            edited3 = capture(lm.model, ["resid.3"], ids)["resid.3"][0]
        truth = (deeper.encode(edited3) - deeper.encode(clean3))[-1]
        rows3 = [r for r in result["features"] if r["sae"] == "resid.3"]
        for r in rows3:
            assert r["delta"] == pytest.approx(float(truth[r["feature"]]), abs=1e-4)


def test_alpha_one_changes_nothing_and_alpha_scales_every_position(analyzed_run, lm, ids):
    saes = load_saes(analyzed_run, "topk-layer")
    sae, key = saes["resid.2"], "resid.2"
    x_Td = capture(lm.model, [key], ids)[key][0]
    _, feat, _ = firing(sae, x_Td)
    same = intervene(lm.model, lm.tokenizer, saes, ids, [Edit("resid.2", feat, 1.0)])
    assert all(r["delta"] == 0 for r in same["logits"]) and same["features"] == []

    doubled = intervene(lm.model, lm.tokenizer, saes, ids, [Edit("resid.2", feat, 2.0)], top=3)
    f_T = sae.encode(x_Td)[:, feat]
    edited = x_Td + f_T[:, None] * (sae.W_dec[feat] / sae.out_scale(key))[None]
    assert_logits_match(doubled, lm.model, ids, by_hand(lm.model, ids, key, edited))


def test_multilayer_sae_is_edited_at_the_chosen_layer(analyzed_run, lm, ids):
    saes = load_saes(analyzed_run, "topk-multilayer")
    (sid,) = saes
    sae, key = saes[sid], "resid.2"
    x_Td = capture(lm.model, [key], ids)[key][0]
    pos, feat, value = firing(sae, x_Td, key=key)
    (edit,) = parse_edits(f"{sid}/{key}:{feat}@{pos}*0")
    result = intervene(lm.model, lm.tokenizer, saes, ids, [edit], position=pos)
    edited = x_Td.clone()
    edited[pos] -= value * sae.W_dec[feat] / sae.out_scale(key)
    assert_logits_match(result, lm.model, ids, by_hand(lm.model, ids, key, edited))
    assert result["edits"][0]["key"] == key
    assert {r["key"] for r in result["features"]} <= {"resid.3"}  # the same SAE's deeper layer


def test_transcoder_edits_mlp_out_through_its_decoder(transcoder_run, lm, ids):
    saes = load_saes(transcoder_run, "tc")
    (sid,) = saes
    sae = saes[sid]
    acts = capture(lm.model, ["mlp_in.1", "mlp_out.1"], ids)
    pos, feat, value = firing(sae, acts["mlp_in.1"][0], key="mlp_in.1")
    result = intervene(lm.model, lm.tokenizer, saes, ids, [Edit(sid, feat, 0.0, pos)])
    edited = acts["mlp_out.1"][0].clone()
    edited[pos] -= value * sae.W_dec[feat] / sae.out_scale("mlp_out.1")
    assert_logits_match(result, lm.model, ids, by_hand(lm.model, ids, "mlp_out.1", edited))


def test_two_edits_at_once_equal_the_sequential_hand_computation(analyzed_run, lm, ids):
    saes = load_saes(analyzed_run, "topk-layer")
    x1 = capture(lm.model, ["resid.1"], ids)["resid.1"][0]
    p1, f1, v1 = firing(saes["resid.1"], x1)
    e1 = x1.clone()
    e1[p1] -= v1 * saes["resid.1"].W_dec[f1] / saes["resid.1"].out_scale("resid.1")
    with torch.no_grad(), splice(lm.model, "resid.1", lambda x: e1[None]):  # resid.2 after the first edit
        x2 = capture(lm.model, ["resid.2"], ids)["resid.2"][0]
    p2, f2, v2 = firing(saes["resid.2"], x2)
    e2 = x2.clone()
    e2[p2] -= v2 * saes["resid.2"].W_dec[f2] / saes["resid.2"].out_scale("resid.2")
    result = intervene(lm.model, lm.tokenizer, saes, ids, parse_edits(f"resid.1:{f1}@{p1}; resid.2:{f2}@{p2}*0"))
    assert_logits_match(result, lm.model, ids, by_hand(lm.model, ids, "resid.2", e2))


def test_steering_adds_the_direction_at_every_position(analyzed_run, lm, ids):
    saes = load_saes(analyzed_run, "topk-layer")
    sae = saes["resid.2"]
    vec = 8.0 * sae.W_dec[3] / sae.out_scale("resid.2")
    text = steer(lm.model, lm.tokenizer, saes, ids, [Edit("resid.2", 3, 8.0)], new_tokens=4)
    with torch.no_grad():
        clean_next = int(lm.model(input_ids=ids).logits[0, -1].argmax())
        with splice(lm.model, "resid.2", lambda x: x + vec):
            steered_next = int(lm.model(input_ids=ids).logits[0, -1].argmax())
    assert text["clean"].startswith(lm.tokenizer.decode([clean_next]))
    assert text["steered"].startswith(lm.tokenizer.decode([steered_next]))
    assert steer(lm.model, lm.tokenizer, saes, ids, [Edit("resid.2", 3, 0.0)], new_tokens=4)["steered"] == text["clean"]


def test_strata_intervene_prints_the_logit_table(analyzed_run, capsys):
    argv = ["intervene", str(analyzed_run), "--name", "topk-layer", "--prompt", PROMPT, "--edit", "resid.1:0*0; resid.1:1*0",
            "--top", "4", "--steer", "resid.2:3*8", "--new-tokens", "3", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "top logit changes at position" in out and "clean continuation:" in out and "steered continuation:" in out
    assert len([ln for ln in out.splitlines() if ln.strip().startswith("'")]) >= 4  # four token rows
