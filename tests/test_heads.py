"""Attention-output SAEs attributed to heads: the per-head terms rebuild the attention output, and the shares
`strata analyze` stores equal a direct per-head computation on each top context's whole model context."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from activations import layout
from activations.hooks import capture
from activations.model import load_model
from activations.reader import open_run
from sae.analysis.heads import attributable, capture_z, head_outputs, n_heads, output_projection
from sae.analysis.index_file import FeatureIndex
from sae.checkpoint import load_saes
from sae.config import SAEConfig


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_terms_sum_to_the_attention_output(arch, tiny_llama, tiny_gpt2):
    """Each head's z through its slice of the output projection, summed with the projection's bias, is attn_out
    as the harvester captures it (Llama: o_proj without bias; GPT-2: Conv1D c_proj with one)."""
    lm = load_model(str(tiny_llama if arch == "llama" else tiny_gpt2), device="cpu")
    ids = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    keys = ["attn_out.0", "attn_out.2"]
    attn_out = capture(lm.model, keys, ids)
    z = capture_z(lm.model, [0, 2], ids)
    H = n_heads(lm.model)
    assert H == 4 and z[2].shape == (2, 24, 32)
    for layer in (0, 2):
        _, W_O, b_O = output_projection(lm.model, layer)
        assert (b_O is None) == (arch == "llama")
        terms = head_outputs(z[layer], W_O, H)  # [2, 24, H, d]
        assert terms.shape == (2, 24, H, 32)
        rebuilt = terms.sum(2) + (b_O if b_O is not None else 0)
        torch.testing.assert_close(rebuilt, attn_out[f"attn_out.{layer}"].float(), atol=1e-5, rtol=1e-5)
        # and one head's term is that head's slice alone: zero every other head's z and project
        z1 = z[layer].clone().reshape(2, 24, H, 8)
        z1[:, :, [0, 2, 3]] = 0
        torch.testing.assert_close(terms[:, :, 1], z1.reshape(2, 24, 32) @ W_O.T, atol=1e-6, rtol=1e-5)


def test_only_attention_output_saes_are_attributed():
    def cfg(mode, keys):
        return type("S", (), {"cfg": SAEConfig(arch="topk", d_in=8, d_out=8, n_latents=16, mode=mode, in_keys=keys)})

    assert attributable(cfg("layer", ["attn_out.3"]))
    assert attributable(cfg("multilayer", ["attn_out.0", "attn_out.1"]))
    assert not attributable(cfg("layer", ["resid.3"]))
    assert not attributable(cfg("multilayer", ["attn_out.0", "resid.1"]))
    assert not attributable(cfg("crosscoder", ["attn_out.0", "attn_out.1"]))
    assert not attributable(cfg("transcoder", ["mlp_in.0"]))


def direct_shares(model, sae, key: str, feature: int, row: int, context: int, run) -> tuple[np.ndarray, float, float]:
    """(share of each head, share of the constant, pre-activation) of `feature` at token `row`, written out by
    hand: the whole model context, z read at o_proj, each head's slice through its slice of W_O and the encoder."""
    layer = int(key.split(".")[1])
    c = row // context
    ids = torch.from_numpy(run.read_tokens(c * context, (c + 1) * context)["token_ids"].astype(np.int64))[None]
    o_proj = model.model.layers[layer].self_attn.o_proj
    seen = {}
    handle = o_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0][0, row % context]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    z, W_O = seen["z"].double(), o_proj.weight.double()
    w = sae.W_enc.detach().double()[:, feature]
    s = float(sae.in_scale(key))
    d_head = W_O.shape[1] // 4
    heads = np.array([float(s * (z[h * d_head:(h + 1) * d_head] @ W_O[:, h * d_head:(h + 1) * d_head].T) @ w)
                      for h in range(4)])
    const = float(sae.b_enc.detach().double()[feature] - sae.b_dec.detach().double() @ w)
    pre = heads.sum() + const
    return heads / pre, const / pre, pre


def test_stored_shares_equal_a_direct_computation(attn_run, tiny_llama):
    idx = FeatureIndex(layout.index_path(attn_run, "attn-layer"))
    saes = load_saes(attn_run, "attn-layer")
    run = open_run(attn_run)
    lm = load_model(str(tiny_llama), device="cpu")
    C = int(run.manifest.context_length)
    assert idx.sae_ids == ["attn_out.0", "attn_out.1", "attn_out.2"]
    for sid in ("attn_out.1", "attn_out.2"):
        sae = saes[sid]
        count = idx.column(sid, "count")
        for f in [int(np.argmax(count)), int(np.argsort(count)[len(count) // 2])]:
            rec = idx.feature(sid, f)
            rows = rec["top_row"]
            assert rec["top_head_share"].shape == (20, 4) and rec["head_share"].shape == (1, 4)
            assert rec["head_contexts"][0] == (rows >= 0).sum() > 0
            for k in np.nonzero(rows >= 0)[0][:4]:
                heads, bias, pre = direct_shares(lm.model, sae, sid, f, int(rows[k]), C, run)
                np.testing.assert_allclose(rec["top_head_share"][k], heads, atol=1e-4)
                assert rec["top_head_bias_share"][k] == pytest.approx(bias, abs=1e-4)
                # the attributed pre-activation is the activation the index found from the fp16 shard
                assert pre == pytest.approx(float(rec["top_value"][k]), rel=2e-2, abs=1e-3)
            # shares and the constant's share add up to the whole pre-activation on every top context
            ok = rows >= 0
            np.testing.assert_allclose(rec["top_head_share"][ok].sum(1) + rec["top_head_bias_share"][ok], 1, atol=1e-4)
            assert np.isnan(rec["top_head_share"][~ok]).all()
            np.testing.assert_allclose(rec["head_share"][0], rec["top_head_share"][ok].mean(0), rtol=1e-5, atol=1e-6)
            assert rec["head_bias_share"][0] == pytest.approx(float(rec["top_head_bias_share"][ok].mean()), abs=1e-6)
    never = np.nonzero(idx.column("attn_out.0", "count") == 0)[0]
    if len(never):  # a feature that never fired has no contexts, so no shares
        rec = idx.feature("attn_out.0", int(never[0]))
        assert rec["head_contexts"][0] == 0 and np.isnan(rec["head_share"]).all()
    assert 0 < idx.meta["seconds_heads"] < idx.meta["seconds_total"]
    idx.close()


def test_multilayer_sae_is_attributed_per_layer(attn_run, tiny_llama):
    idx = FeatureIndex(layout.index_path(attn_run, "attn-multi"))
    (sid,) = idx.sae_ids
    sae = load_saes(attn_run, "attn-multi")[sid]
    run = open_run(attn_run)
    lm = load_model(str(tiny_llama), device="cpu")
    slots = idx.column(sid, "top_slot")
    rows = idx.column(sid, "top_row")
    share = idx.column(sid, "head_share")
    assert share.shape == (64, 3, 4)
    np.testing.assert_array_equal(idx.column(sid, "head_contexts"),
                                  np.stack([((rows >= 0) & (slots == s)).sum(1) for s in range(3)], 1))
    # a feature whose top contexts span two layers: each layer's mean is over that layer's contexts, each context
    # attributed with that layer's heads and input scale
    f = next(f for f in range(64) if len(set(slots[f][rows[f] >= 0].tolist())) >= 2)
    top = idx.column(sid, "top_head_share")[f]
    for s in sorted(set(slots[f][rows[f] >= 0].tolist())):
        at = np.nonzero((rows[f] >= 0) & (slots[f] == s))[0]
        np.testing.assert_allclose(share[f, s], top[at].mean(0), rtol=1e-5, atol=1e-6)
        heads, _, _ = direct_shares(lm.model, sae, f"attn_out.{s}", f, int(rows[f][at[0]]), 32, run)
        np.testing.assert_allclose(top[at[0]], heads, atol=1e-4)
    idx.close()


def test_resid_saes_carry_no_head_fields(analyzed_run):
    idx = FeatureIndex(layout.index_path(analyzed_run, "topk-layer"))
    assert not any(idx.has(sid, "head_share") or idx.has(sid, "top_head_share") for sid in idx.sae_ids)
    assert idx.meta["seconds_heads"] == 0
    idx.close()
