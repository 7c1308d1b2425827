"""Interventions and steering on SAEs that write several layers: a cross-layer transcoder (a feature of layer s
writes mlp_out.t for every t >= s) and a crosscoder (one decoder block per key). Each edit must equal editing
every written activation by hand (x + (new - f) * that key's decoder block, the error term kept) and re-running
the rest of the tiny Llama; `strata intervene` on a CLT run prints the table."""
from __future__ import annotations

import shutil
from contextlib import ExitStack

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
def multikey_run(tmp_path_factory, tiny_run):
    """The tiny harvest with a TopK CLT over MLPs 0-2 ("clt") and a crosscoder over resid.1-2 ("cc")."""
    from sae.train import train
    from sae.train_config import TrainConfig

    run = tmp_path_factory.mktemp("multikey") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train", "index", "share"))
    common = dict(run_dir=str(run), expansion=2, k=4, batch_size=256, max_tokens=1024, progress=False,
                  wandb_mode="disabled", device="cpu")
    train(TrainConfig(name="clt", mode="clt", **common))
    train(TrainConfig(name="cc", mode="crosscoder", sites="resid", layers="1,2", **common))
    return run


def with_deltas(model, ids, deltas: dict):
    """Logits with the fixed raw-unit change deltas[key] [T, d] added to the activation at each key."""
    with torch.no_grad(), ExitStack() as stack:
        for key, d_Td in deltas.items():
            stack.enter_context(splice(model, key, lambda x, _d=d_Td: x + _d[None].to(x.dtype)))
        return model(input_ids=ids, use_cache=False).logits[0].float()


def assert_logits_match(result, model, ids, expected_TV):
    clean_TV = model(input_ids=ids, use_cache=False).logits[0].float()
    p = result["position"]
    assert result["logits"], "some logit must change"
    for row in result["logits"]:
        assert row["clean"] == pytest.approx(float(clean_TV[p, row["id"]]), abs=1e-4)
        assert row["edited"] == pytest.approx(float(expected_TV[p, row["id"]]), abs=1e-4)
    delta = (expected_TV[p] - clean_TV[p]).abs()
    assert float(delta.max()) == pytest.approx(abs(result["logits"][0]["delta"]), abs=1e-4)


def clt_block(sae, j_global: int, t: int) -> torch.Tensor:
    """Row j of the CLT's full decoder, output block t, in raw units (read off W_dec, not decoder_vectors)."""
    d = sae.cfg.d_out // len(sae.cfg.out_keys)
    return sae.W_dec[j_global, t * d:(t + 1) * d].float() / float(sae.cfg.out_scales[t])


def test_scaling_a_clt_feature_edits_every_mlp_out_it_writes(multikey_run, lm, ids):
    """alpha = 25 at one position on a layer-0 feature."""
    saes = load_saes(multikey_run, "clt")
    sae = saes["clt"]
    n, T = sae.cfg.n_latents // 3, ids.shape[1]
    x0 = capture(lm.model, ["mlp_in.0"], ids)["mlp_in.0"][0]
    f_Tn = sae.encode_layer(0, x0)
    f_Tn[-1] = 0  # an edit before the last position, so the later positions and deeper layers see it
    pos, j = divmod(int(f_Tn.argmax()), n)
    value = float(f_Tn[pos, j])
    assert value > 0
    with torch.no_grad():  # a briefly trained CLT writes little beyond its own layer: give the feature a voice there
        sae.W_dec_from[0][j, 1:] = torch.randn(2, x0.shape[1], generator=torch.Generator().manual_seed(0))
    result = intervene(lm.model, lm.tokenizer, saes, ids, parse_edits(f"clt:{j}@{pos}*25"), top=5)

    deltas = {}
    for t in range(3):  # a layer-0 feature writes MLP outputs 0, 1 and 2
        d_Td = torch.zeros(T, x0.shape[1])
        d_Td[pos] = 24 * value * clt_block(sae, j, t)
        deltas[f"mlp_out.{t}"] = d_Td
    assert all(float(d.norm()) > 0 for d in deltas.values()), "the feature writes every later MLP output"
    expected_TV = with_deltas(lm.model, ids, deltas)
    assert_logits_match(result, lm.model, ids, expected_TV)
    (applied,) = result["edits"]
    assert applied["keys"] == ["mlp_out.0", "mlp_out.1", "mlp_out.2"]
    assert applied["clean_value"] == pytest.approx(value, rel=1e-5)

    # editing only the source layer's output is a different (smaller) intervention: the later blocks matter
    only_first = with_deltas(lm.model, ids, {"mlp_out.0": deltas["mlp_out.0"]})
    assert float((only_first[-1] - expected_TV[-1]).abs().max()) > 1e-3  # ten times the match tolerance

    # deeper CLT features are reported under their global number (layer block s -> s * n + j)
    with torch.no_grad(), ExitStack() as stack:
        for key, d_Td in deltas.items():
            stack.enter_context(splice(lm.model, key, lambda x, _d=d_Td: x + _d[None]))
        edited2 = capture(lm.model, ["mlp_in.2"], ids)["mlp_in.2"][0]
    clean2 = capture(lm.model, ["mlp_in.2"], ids)["mlp_in.2"][0]
    truth_n = (sae.encode_layer(2, edited2) - sae.encode_layer(2, clean2))[-1]
    rows = [r for r in result["features"] if r["key"] == "mlp_in.2"]
    assert rows and {r["key"] for r in result["features"]} <= {"mlp_in.1", "mlp_in.2"}
    for r in rows:
        assert 2 * n <= r["feature"] < 3 * n
        assert r["delta"] == pytest.approx(float(truth_n[r["feature"] - 2 * n]), abs=1e-4)


def test_a_deeper_clt_feature_is_scaled_from_its_live_value(multikey_run, lm, ids):
    """alpha = 2 at every position on a layer-1 feature: it writes mlp_out.1 and mlp_out.2 only."""
    saes = load_saes(multikey_run, "clt")
    sae = saes["clt"]
    n = sae.cfg.n_latents // 3
    x1 = capture(lm.model, ["mlp_in.1"], ids)["mlp_in.1"][0]
    f_Tn = sae.encode_layer(1, x1)
    j = int(f_Tn.sum(0).argmax())
    result = intervene(lm.model, lm.tokenizer, saes, ids, [Edit("clt", n + j, 2.0)], top=3)
    deltas = {f"mlp_out.{t}": f_Tn[:, j, None] * clt_block(sae, n + j, t)[None] for t in (1, 2)}
    assert_logits_match(result, lm.model, ids, with_deltas(lm.model, ids, deltas))
    assert result["edits"][0]["keys"] == ["mlp_out.1", "mlp_out.2"]


def test_crosscoder_feature_edits_every_key_it_writes(multikey_run, lm, ids):
    saes = load_saes(multikey_run, "cc")
    (sid,) = saes
    sae = saes[sid]
    acts = capture(lm.model, ["resid.1", "resid.2"], ids)
    x1, x2 = acts["resid.1"][0], acts["resid.2"][0]
    f_Tn = sae.encode(torch.cat([x1, x2], -1))
    pos, feat = divmod(int(f_Tn.argmax()), f_Tn.shape[1])
    value = float(f_Tn[pos, feat])
    assert value > 0
    result = intervene(lm.model, lm.tokenizer, saes, ids, [Edit(sid, feat, 0.0, pos)], position=pos)
    d = x1.shape[1]
    deltas = {}
    for b, key in enumerate(("resid.1", "resid.2")):
        d_Td = torch.zeros_like(x1)
        d_Td[pos] = -value * sae.W_dec[feat, b * d:(b + 1) * d] / float(sae.cfg.out_scales[b])
        deltas[key] = d_Td
    assert_logits_match(result, lm.model, ids, with_deltas(lm.model, ids, deltas))
    assert result["edits"][0]["keys"] == ["resid.1", "resid.2"]
    assert result["edits"][0]["clean_value"] == pytest.approx(value, rel=1e-5)
    # alpha 1 leaves the model as it was
    same = intervene(lm.model, lm.tokenizer, saes, ids, [Edit(sid, feat, 1.0, pos)])
    assert all(r["delta"] == 0 for r in same["logits"])


def test_a_crosscoder_reading_only_deeper_keys_is_reported_downstream(multikey_run, lm, ids):
    """Zeroing a layer-0 CLT feature changes resid.1 and resid.2, both of which the crosscoder reads: its features'
    changes are listed, each its codes on the hand-edited activations minus its clean codes."""
    saes = load_saes(multikey_run, "clt") | load_saes(multikey_run, "cc")
    clt, cc = saes["clt"], saes["crosscoder"]
    x0 = capture(lm.model, ["mlp_in.0"], ids)["mlp_in.0"][0]
    f_Tn = clt.encode_layer(0, x0)
    f_Tn[-1] = 0
    pos, j = divmod(int(f_Tn.argmax()), f_Tn.shape[1])
    value = float(f_Tn[pos, j])
    result = intervene(lm.model, lm.tokenizer, saes, ids, [Edit("clt", j, 0.0, pos)], n_features=50)
    T = ids.shape[1]
    deltas = {}
    for t in range(3):
        d_Td = torch.zeros(T, x0.shape[1])
        d_Td[pos] = -value * clt_block(clt, j, t)
        deltas[f"mlp_out.{t}"] = d_Td
    with torch.no_grad(), ExitStack() as stack:
        for key, d_Td in deltas.items():
            stack.enter_context(splice(lm.model, key, lambda x, _d=d_Td: x + _d[None]))
        edited = capture(lm.model, ["resid.1", "resid.2"], ids)
    clean = capture(lm.model, ["resid.1", "resid.2"], ids)
    both = [torch.cat([acts["resid.1"][0], acts["resid.2"][0]], -1) for acts in (edited, clean)]
    truth_n = (cc.encode(both[0]) - cc.encode(both[1]))[-1]
    rows = [r for r in result["features"] if r["sae"] == "crosscoder"]
    assert rows, "the crosscoder's features move and are reported"
    for r in rows:
        assert r["delta"] == pytest.approx(float(truth_n[r["feature"]]), abs=1e-4)
    # a crosscoder reading a key on the near side of an edit (resid.1, edited at resid.2) is not reported
    near = intervene(lm.model, lm.tokenizer, saes, ids, [Edit("clt", 2 * f_Tn.shape[1], 0.0, pos)])
    assert not [r for r in near["features"] if r["sae"] == "crosscoder"]


@pytest.mark.parametrize("train, spec, keys", [("clt", "clt:{j}*6", ["mlp_out.0", "mlp_out.1", "mlp_out.2"]),
                                               ("cc", "crosscoder:3*6", ["resid.1", "resid.2"])])
def test_steering_adds_the_direction_at_every_written_key(multikey_run, lm, ids, train, spec, keys):
    saes = load_saes(multikey_run, train)
    sae = next(iter(saes.values()))
    j = 5
    (edit,) = parse_edits(spec.format(j=j))
    d = sae.cfg.d_out // len(sae.cfg.out_keys)
    vecs = {k: 6.0 * sae.W_dec[edit.feature, b * d:(b + 1) * d].float() / float(sae.cfg.out_scales[b])
            for b, k in enumerate(sae.cfg.out_keys) if k in keys}
    text = steer(lm.model, lm.tokenizer, saes, ids, [edit], new_tokens=4)
    with torch.no_grad():
        clean_next = int(lm.model(input_ids=ids).logits[0, -1].argmax())
        steered_next = int(with_deltas(lm.model, ids, {k: v[None] for k, v in vecs.items()})[-1].argmax())
    assert text["clean"].startswith(lm.tokenizer.decode([clean_next]))
    assert text["steered"].startswith(lm.tokenizer.decode([steered_next]))


def test_strata_intervene_on_a_clt_run(multikey_run, capsys):
    argv = ["intervene", str(multikey_run), "--name", "clt", "--prompt", PROMPT, "--edit", "clt:3*0; clt:70@2*3",
            "--top", "4", "--steer", "clt:5*8", "--new-tokens", "3", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "clt:3 @ mlp_out.0, mlp_out.1, mlp_out.2 (every position" in out
    assert "clt:70 @ mlp_out.1, mlp_out.2 (position 2" in out
    assert "top logit changes at position" in out and "steered continuation:" in out
    assert len([ln for ln in out.splitlines() if ln.strip().startswith("'")]) >= 4


def test_an_sae_with_no_known_place_to_edit_is_refused_naming_the_modes_that_work():
    from types import SimpleNamespace

    from activations.errors import StrataError
    from sae.circuits.intervene import check_edits

    odd = SimpleNamespace(cfg=SimpleNamespace(mode="layer", in_keys=["resid.1", "resid.2"], out_keys=["resid.1"],
                                              n_latents=8))
    with pytest.raises(StrataError, match="has no known place to edit; interventions work on layer, multilayer, "
                                          "transcoder, crosscoder, clt SAEs"):
        check_edits({"odd": odd}, [Edit("odd", 1)])
