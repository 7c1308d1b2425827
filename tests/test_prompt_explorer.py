"""The prompt explorer on the tiny analysed run: logit lens and SAE codes checked against a direct computation
with transformers, positions left out of training greyed, explanations on hover, a feature followed across depth,
and a text longer than the context cut with one line saying so (AppTest; the browser checks are in
test_dashboard_browser.py)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
TEXT = "def main():\n    return the list of numbers"


@pytest.fixture(scope="module")
def lm(analyzed_run):
    import json

    from activations.model import load_model

    model_id = json.loads((analyzed_run / "manifest.json").read_text())["model"]["id"]
    return load_model(model_id, device="cpu")


def direct(lm, text: str):
    """(input ids [t], residual streams resid.0-3 [t, d], logits [t, vocab]) straight from transformers; the
    last hidden state transformers returns is after the final norm, so resid.3 is the norm's input."""
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    before_norm = []
    hook = lm.model.model.norm.register_forward_pre_hook(lambda m, args: before_norm.append(args[0]))
    try:
        with torch.no_grad():
            out = lm.model(input_ids=ids, output_hidden_states=True)
    finally:
        hook.remove()
    return ids[0], [h[0] for h in out.hidden_states[:-1]] + [before_norm[0][0]], out.logits[0]


def lens_direct(lm, hidden: torch.Tensor) -> torch.Tensor:
    """What the lens should be: the model's own final norm and head applied to a residual."""
    with torch.no_grad():
        return torch.softmax(lm.model.lm_head(lm.model.model.norm(hidden)).float(), dim=-1)


def test_logit_lens_equals_a_direct_computation(analyzed_run, lm):
    from dashboard.views.prompt import prompt_features
    from sae.checkpoint import load_saes

    saes = load_saes(analyzed_run, "topk-layer")
    result = prompt_features(lm, saes, TEXT, max_tokens=32)
    ids, hidden, logits = direct(lm, TEXT)
    assert len(result["tokens"]) == len(ids) == result["n_tokens"]
    assert [r["key"] for r in result["lens"]] == ["resid.0", "resid.1", "resid.2", "resid.3"]
    assert result["lens"][-1]["label"] == "lens resid.3 (model output)"
    # the lens of the last residual is the model's own output
    torch.testing.assert_close(lens_direct(lm, hidden[3]), torch.softmax(logits.float(), -1))
    for r in result["lens"]:
        want = lens_direct(lm, hidden[int(r["key"].split(".")[1])])
        top = torch.topk(want, 5, dim=-1)
        assert np.array_equal(r["ids"], top.indices.numpy()), r["key"]
        np.testing.assert_allclose(r["probs"], top.values.numpy(), rtol=1e-4, atol=1e-6)
    # and every SAE column holds that SAE's codes of the same residual
    for c in result["columns"]:
        layer = int(c["key"].split(".")[1])
        want = saes[c["sae"]].encode(hidden[layer].float(), key=c["key"]).detach().numpy()
        np.testing.assert_allclose(c["codes"], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(c["val"], -np.sort(-want, 1)[:, :3], rtol=1e-4, atol=1e-5)  # the top 3


def test_a_text_longer_than_the_context_is_cut_to_it(analyzed_run, lm):
    from dashboard.views.prompt import prompt_features
    from sae.checkpoint import load_saes

    long = " ".join(["the list of numbers"] * 30)
    result = prompt_features(lm, load_saes(analyzed_run, "topk-multilayer"), long, max_tokens=32)
    assert len(result["tokens"]) == 32 and result["n_tokens"] > 32
    assert all(c["codes"].shape[0] == 32 for c in result["columns"])
    assert all(r["ids"].shape == (32, 5) for r in result["lens"])


def test_matched_chain_follows_the_banks_best_matches(analyzed_run):
    from sae.analysis.feature_chain import matched_chain
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(analyzed_run / "index" / "topk-layer.h5")
    bank = {m["up"]: (m["down"], idx.match_arrays(m["j"])) for m in idx.matches() if m["kind"] == "bank"}
    assert set(bank) == {"resid.0", "resid.1", "resid.2"}
    best = {s: a["best_idx"] for s, (_, a) in bank.items()}
    f = int(best["resid.0"][best["resid.0"] >= 0][0])  # a feature of resid.1 that a feature of resid.0 points at
    chain = matched_chain(idx, "resid.1", f)
    saes = [link["sae"] for link in chain]
    assert saes[0] == "resid.0" and "resid.1" in saes and saes == sorted(saes)  # shallowest first, each SAE once
    me = saes.index("resid.1")
    assert chain[me] == {"sae": "resid.1", "feature": f, "corr": None}
    for a, b in zip(chain, chain[1:]):  # every link is the shallower SAE's best (causal, else correlation) match
        assert int(best[a["sae"]][a["feature"]]) == b["feature"]
    last = chain[-1]  # the chain stops at the bank's end or where a feature has no match
    assert last["sae"] == "resid.3" or best[last["sae"]][last["feature"]] < 0
    up = chain[0]
    corr = bank["resid.0"][1]["best_corr"]
    pointing = np.nonzero(best["resid.0"] == f)[0]
    assert up["feature"] == int(pointing[np.argmax(corr[pointing])])
    multi = FeatureIndex(analyzed_run / "index" / "topk-multilayer.h5")
    assert matched_chain(multi, multi.sae_ids[0], 2) == [{"sae": multi.sae_ids[0], "feature": 2, "corr": None}]


# ---------------------------------------------------------------- the page (AppTest)
def explorer(run, monkeypatch, train: str, text: str):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("STRATA_RUN", str(run))
    monkeypatch.setenv("STRATA_READ_ONLY", "0")
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(page="prompt", train=train)
    at.run()
    at.text_area(key="prompt_text").input(text)
    at.button(key="prompt_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def page_grid(at) -> str:
    return next(m.value for m in at.markdown if "strata-prompt" in m.value)


def depth_table(at):
    return next(d.value for d in at.dataframe if "link corr" in d.value.columns)


def cells(grid: str, row_label: str) -> list[str]:
    """The cells of the grid row whose label is `row_label` (first cell excluded)."""
    row = next(r for r in re.findall(r"<tr>(.*?)</tr>", grid, flags=re.S) if f">{row_label}</span>" in r)
    return re.findall(r"<td>(.*?)</td>", row, flags=re.S)[1:]


def test_the_page_greys_untrained_positions_and_shows_explanations(analyzed_run, monkeypatch, lm):
    from sae.analysis.index_file import FeatureIndex

    at = explorer(analyzed_run, monkeypatch, "topk-layer", TEXT)
    grid = page_grid(at)
    ids, hidden, _ = direct(lm, TEXT)
    # position 0 (the sink, exclude_first = 1 in the training config) is greyed, with the reason on hover
    heads = re.findall(r'<span class="(tok[^"]*)" data-pos="(\d+)" title="([^"]*)"', grid)
    assert len(heads) == len(ids)
    assert heads[0][0] == "tok strata-untrained" and "never trained here" in heads[0][2]
    assert all(cls == "tok" for cls, _, _ in heads[1:])
    assert any("Grey positions 0-0 were left out of training" in c.value for c in at.caption)
    row = cells(grid, "resid.2")
    assert 'class="strata-untrained"' in row[0] and "strata-chip" not in row[0]
    # the other positions show features, each with its explanation from the index on hover
    expl = FeatureIndex(analyzed_run / "index" / "topk-layer.h5").column("resid.2", "explanation")
    chips = re.findall(r'<a class="strata-chip" href="[^"]*f=(\d+)" target="_self" title="([^"]*)"', "".join(row[1:]))
    assert chips
    from markupsafe import escape

    for f, title in chips:
        assert title.startswith(f"resid.2 #{f} (activation ") and title.endswith(str(escape(expl[int(f)])))
    # the logit lens row of resid.1 shows, at every position, the top prediction of a direct computation
    want = lens_direct(lm, hidden[1]).argmax(-1)
    from dashboard.render import visible_token

    shown = [re.search(r'data-ids="(\d+),', c).group(1) for c in cells(grid, "lens resid.1")]
    assert [int(s) for s in shown] == want.tolist()
    texts = [re.search(r">([^<]*)</span>$", c).group(1) for c in cells(grid, "lens resid.1")]
    assert texts == [str(escape(visible_token(lm.tokenizer.decode([int(i)])))) for i in want]
    # the detail table opens on the first trained position, explanations included
    detail = next(d.value for d in at.dataframe if "activation" in d.value.columns)
    assert set(detail.columns) == {"layer", "feature", "activation", "explanation"}
    assert at.selectbox(key="prompt_tok").value == 1
    at.selectbox(key="prompt_tok").select(0).run()
    assert any("never trained here" in i.value for i in at.info)


def test_one_feature_followed_across_the_bank(analyzed_run, monkeypatch, lm):
    from sae.analysis.feature_chain import matched_chain
    from sae.analysis.index_file import FeatureIndex
    from sae.checkpoint import load_saes

    at = explorer(analyzed_run, monkeypatch, "topk-layer", TEXT)
    _, hidden, _ = direct(lm, TEXT)
    at.multiselect(key="prompt_tokens").set_value([2, 4]).run()
    ci, f = at.selectbox(key="prompt_feature").value
    table = depth_table(at)
    chain = matched_chain(FeatureIndex(analyzed_run / "index" / "topk-layer.h5"), f"resid.{ci}", f)
    assert list(table["layer"]) == [link["sae"] for link in chain] and f"resid.{ci}" in list(table["layer"])
    assert list(table["feature"]) == [link["feature"] for link in chain]
    saes = load_saes(analyzed_run, "topk-layer")
    for link, (_, row) in zip(chain, table.iterrows()):
        layer = int(link["sae"].split(".")[1])
        codes = saes[link["sae"]].encode(hidden[layer].float(), key=link["sae"]).detach()
        for t in (2, 4):
            col = next(c for c in table.columns if c.startswith(f"{t}: "))
            assert row[col] == pytest.approx(float(codes[t, link["feature"]]), abs=1e-4)
    assert at.get("plotly_chart")


def test_one_feature_of_a_multilayer_sae_across_its_layers(analyzed_run, monkeypatch):
    at = explorer(analyzed_run, monkeypatch, "topk-multilayer", TEXT)
    ci, f = at.selectbox(key="prompt_feature").value
    table = depth_table(at)
    sid = at.session_state.prompt_result["columns"][ci]["sae"]
    assert list(table["layer"]) == [f"{sid} @ resid.{i}" for i in range(4)]
    assert set(table["feature"]) == {f}


def test_a_text_longer_than_the_context_says_so_in_one_line(analyzed_run, monkeypatch):
    at = explorer(analyzed_run, monkeypatch, "topk-layer", " ".join(["the list of numbers"] * 30))
    assert len(at.warning) == 1
    assert re.fullmatch(r"The text is \d+ tokens, longer than the 32-token contexts the SAEs were trained on: "
                        r"only its first 32 tokens are run and shown\.", at.warning[0].value)
    assert len(re.findall(r'data-pos="', page_grid(at))) == 32

