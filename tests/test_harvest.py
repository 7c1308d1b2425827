"""A researcher harvests activations from a model and checks they are exactly what the model computes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import harvest_tiny
from transformers import AutoModelForCausalLM

from activations.hooks import capture
from activations.manifest import load_manifest
from activations.reader import open_run


def _hidden_states(model_dir, token_ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model, model(input_ids=torch.from_numpy(token_ids).long(), output_hidden_states=True).hidden_states


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_stored_activations_equal_a_direct_forward(arch, request, tmp_path):
    model_dir = request.getfixturevalue(arch)
    m = harvest_tiny(tmp_path / "run", model_dir, sites="resid,mlp_out,attn_out", max_tokens=1024)
    run = open_run(tmp_path / "run")
    ctx = m.context_length
    toks = run.read_tokens(0, 4 * ctx)["token_ids"].reshape(4, ctx)
    model, hs = _hidden_states(model_dir, toks)
    rows = np.arange(4 * ctx)
    for layer in range(m.n_layers):  # resid.L == hidden_states[L]; the last one is taken before the final norm
        stored = run.read_rows(f"resid.{layer}", rows)
        want = hs[layer].reshape(-1, m.d_model).numpy()
        np.testing.assert_allclose(stored, want, rtol=2e-3, atol=2e-3)
    direct = capture(model, ["mlp_out.1", "attn_out.2", f"resid.{m.n_layers}"], torch.from_numpy(toks).long())
    for key, value in direct.items():
        np.testing.assert_allclose(run.read_rows(key, rows), value.reshape(-1, m.d_model).numpy(), rtol=2e-3, atol=2e-3)


def test_tokens_trace_back_to_the_corpus(tiny_run, tiny_llama):
    from transformers import AutoTokenizer

    from activations.corpus import builtin_documents

    run = open_run(tiny_run)
    t = run.read_tokens(0, run.n_tokens)
    ctx = run.manifest.context_length
    assert (t["doc_ids"][::ctx] == -1).all() and (t["positions"][::ctx] == -1).all(), "each context starts with BOS"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    first_doc = next(builtin_documents())
    ids = tok(first_doc, add_special_tokens=False).input_ids + [tok.eos_token_id]  # documents end with EOS
    body = t["doc_ids"] == 0
    np.testing.assert_array_equal(t["token_ids"][body], np.asarray(ids)[t["positions"][body]])
    assert len(set(t["doc_ids"][t["doc_ids"] >= 0].tolist())) >= 1


def test_early_exit_skips_blocks_after_the_deepest_key(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    calls = []
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda *a, _i=i: calls.append(_i))
    capture(model, ["resid.1"], torch.zeros(1, 8, dtype=torch.long))
    assert calls == [0], "resid.1 needs block 0 only"


def test_manifest_describes_the_run(tiny_run):
    m = load_manifest(tiny_run)
    assert m.complete and m.n_tokens == 6144 and len(m.shards) == 6
    assert sum(s.rows for s in m.shards) == m.n_tokens
    assert m.model["n_layers"] == 3 and m.dims["resid.3"] == 32
    assert set(m.norm_stats) == set(m.keys) and all(v["count"] == m.n_tokens for v in m.norm_stats.values())
    assert {"torch", "transformers", "h5py"} <= set(m.versions)
    for s in m.shards:
        assert set(s.files) == {"tokens", *m.keys} and all(len(f["sha256"]) == 64 for f in s.files.values())


def test_local_text_sources(tmp_path, tiny_gpt2):
    data = tmp_path / "corpus"
    data.mkdir()
    words = " ".join(f"word{i % 97}" for i in range(3000))
    (data / "a.txt").write_text(words)
    (data / "b.jsonl").write_text("\n".join(json.dumps({"body": words[:2000]}) for _ in range(3)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [words] * 2}), data / "c.parquet")
    m = harvest_tiny(tmp_path / "run", tiny_gpt2, data=str(data), text_column="body", sites="resid", layers="1",
                     max_tokens=0)
    assert m.corpus["kind"] == "local"
    docs = set(open_run(tmp_path / "run").read_tokens(0, m.n_tokens)["doc_ids"].tolist())
    assert {0, 1, 2, 3, 4, 5} <= docs, "all six documents (txt, 3 jsonl lines, 2 parquet rows) were read"


def test_bfloat16_storage_round_trips(tmp_path, tiny_llama):
    m = harvest_tiny(tmp_path / "run", tiny_llama, dtype="bfloat16", sites="resid", layers="2", max_tokens=512)
    run = open_run(tmp_path / "run")
    toks = run.read_tokens(0, 2 * m.context_length)["token_ids"].reshape(2, -1)
    _, hs = _hidden_states(tiny_llama, toks)
    got = run.read_rows("resid.2", np.arange(toks.size))
    np.testing.assert_allclose(got, hs[2].reshape(-1, m.d_model).numpy(), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_real_packaged_smollm2_harvest(tmp_path):
    """Integration: the embedded model on the built-in corpus, a few hundred tokens."""
    from activations.config import HarvestConfig
    from activations.harvest import harvest
    from activations.verify import verify_run

    m = harvest(HarvestConfig(run_dir=str(tmp_path / "smol"), layers="0-30:10", max_tokens=512, progress=False))
    assert m.model["architecture"] == "LlamaForCausalLM" and m.model["n_layers"] == 30 and m.d_model == 576
    assert m.keys == ["resid.0", "resid.10", "resid.20", "resid.30"] and m.n_tokens == 512
    assert verify_run(tmp_path / "smol") == []
    norms = [m.norm_stats[k]["mean_norm"] for k in m.keys]
    assert norms[-1] > norms[0], "the residual stream grows with depth"
