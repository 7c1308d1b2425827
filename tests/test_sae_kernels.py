"""The training step's kernels against the plain dense computation they replace: values and gradients."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae import cpu_select, kernels
from sae.config import SAEConfig
from sae.models import build_sae


def same_set(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.sort(1).values, b.sort(1).values)


# kernels.topk_rows is the compiled selection on CPU wherever a C++ compiler works (sae/cpu_select.py);
# grouped_topk_rows is the torch-operations path it falls back to (and the one GPUs take)
TOPKS = [pytest.param(kernels.topk_rows, id="topk_rows"), pytest.param(kernels.grouped_topk_rows, id="grouped")]


def test_the_compiled_topk_is_built_wherever_a_compiler_is():
    if cpu_select._compiler() is None:
        pytest.skip("no C++ compiler on this machine: the torch path is used (tested below)")
    assert cpu_select.available(), cpu_select.status()
    assert cpu_select.supports(torch.zeros(8, 64), 4) and cpu_select.supports(torch.zeros(8, 64).bfloat16(), 4)
    assert not cpu_select.supports(torch.zeros(8, 64, dtype=torch.float64), 4)


@pytest.mark.parametrize("topk", TOPKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_rows_picks_the_same_latents_as_torch_topk(topk, dtype):
    torch.manual_seed(0)
    # 97 is prime (the grouped path's plain-topk fallback); 20 entries hold fewer chunks than k (every entry a candidate)
    for B, n, k in ((300, 4608, 32), (33, 512, 8), (20, 97, 5), (7, 20, 5), (5, 64, 64)):
        pre = (torch.randn(B, n) * torch.rand(1, n) - 0.5).to(dtype)  # uneven latent scales, many negatives
        vals, cols = topk(pre, k)
        ref_vals, ref_cols = pre.topk(k, dim=1)
        assert vals.dtype == dtype and cols.dtype == torch.int64
        assert same_set(vals, ref_vals) and torch.equal(pre.gather(1, cols), vals)
        if dtype == torch.float32:  # bf16 rows tie often: equal values may swap columns
            assert same_set(cols, ref_cols)
    wide = torch.randn(64, 700).to(dtype)
    vals, cols = topk(wide[:, 50:650], 16)  # rows that are a strided view of a wider tensor
    assert same_set(vals, wide[:, 50:650].topk(16, dim=1).values) and bool((cols < 600).all())
    assert kernels._group_size(4608, 32) == 24 and kernels._group_size(97, 5) is None


@pytest.mark.parametrize("topk", TOPKS)
def test_topk_rows_with_ties_infinities_and_a_nan_row(topk):
    torch.manual_seed(2)
    pre = torch.randint(-3, 4, (64, 4608)).float()  # seven values: ties everywhere, also at the k-th value
    pre[1] = float("-inf")
    pre[2, :100] = float("inf")
    pre[4] = -0.0
    pre[4, 5] = 0.0
    vals, cols = topk(pre, 32)
    assert torch.equal(vals.sort(1).values, pre.topk(32, dim=1).values.sort(1).values)
    assert torch.equal(pre.gather(1, cols), vals) and all(len(set(r.tolist())) == 32 for r in cols)
    pre[3, 7] = float("nan")  # a diverged step: no crash; the training loop then stops on the non-finite loss
    vals, cols = topk(pre, 32)
    assert vals.shape == (64, 32) and bool(vals[3].isnan().any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_level_topk_picks_the_same_entries_as_torch_topk(dtype):
    """BatchTopK's choice: the k*B largest entries of the whole batch (compiled on CPU where it could be built)."""
    torch.manual_seed(3)
    for B, n, k in ((512, 4608, 32), (33, 97, 5), (4, 8, 8)):
        pre = (torch.randn(B, n) * torch.rand(1, n) - 0.3).to(dtype)
        vals, flat = kernels.topk_flat(pre, k * B)
        assert vals.shape == flat.shape == (k * B,) and flat.dtype == torch.int64
        assert torch.equal(vals.sort().values, pre.reshape(-1).topk(k * B).values.sort().values)
        assert torch.equal(pre.reshape(-1)[flat], vals) and flat.unique().numel() == k * B
    ties = torch.randint(-2, 3, (64, 256)).to(dtype)
    vals, flat = kernels.topk_flat(ties, 1000)
    assert torch.equal(vals.sort().values, ties.reshape(-1).topk(1000).values.sort().values)
    assert flat.unique().numel() == 1000


def test_without_a_compiler_training_selects_with_torch_and_gets_the_same_latents(tmp_path):
    """A machine with no C++ compiler: status says so, and the TopK forward picks the same latents."""
    code = (
        "import torch\n"
        "from sae import cpu_select, kernels\n"
        "assert not cpu_select.available(), cpu_select.status()\n"
        "print(cpu_select.status())\n"
        "torch.manual_seed(0)\n"
        "pre = torch.randn(256, 4608)\n"
        "vals, cols = kernels.topk_rows(pre, 32)\n"
        "assert torch.equal(vals.sort(1).values, pre.topk(32, dim=1).values.sort(1).values)\n"
        "vals, flat = kernels.topk_flat(pre, 32 * 256)\n"
        "assert torch.equal(vals.sort().values, pre.reshape(-1).topk(32 * 256).values.sort().values)\n"
    )
    env = dict(os.environ, PATH=str(tmp_path), CXX="", STRATA_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch top-k (no C++ compiler found ($CXX, c++, g++, clang++))"
    assert not (tmp_path / "cache").exists()


def test_sparse_decode_matches_the_dense_product_and_its_gradients():
    torch.manual_seed(0)
    B, n, d = 6, 30, 5
    per_row = [3, 0, 5, 1, 4, 2]  # BatchTopK-style rows of any length, one empty
    rows = torch.repeat_interleave(torch.arange(B), torch.tensor(per_row))
    cols = torch.cat([torch.randperm(n)[:c] for c in per_row])
    vals = torch.rand(cols.numel(), dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, d, dtype=torch.float64)

    out = kernels.sparse_decode(vals, cols, kernels.row_offsets(rows, B), W_dec)
    ((out - target) ** 2).sum().backward()
    got = out.detach(), vals.grad.clone(), W_dec.grad.clone()
    vals.grad = W_dec.grad = None

    f = torch.zeros(B, n, dtype=torch.float64).index_put((rows, cols), vals)
    ref = f @ W_dec
    ((ref - target) ** 2).sum().backward()
    for g, want in zip(got, (ref.detach(), vals.grad, W_dec.grad)):
        assert torch.allclose(g, want, atol=1e-12)


def test_sampled_preacts_are_the_dense_preacts_at_the_chosen_pairs():
    torch.manual_seed(0)
    B, d, n, k = 8, 12, 40, 3
    x_c = torch.randn(B, d)
    W_enc = torch.randn(n, d).t()  # latent-major storage, as SAE.W_enc
    b_enc = torch.randn(n)
    cols = torch.stack([torch.randperm(n)[:k] for _ in range(B)]).reshape(-1)
    rows = torch.arange(B).repeat_interleave(k)
    got = kernels.sampled_preacts(x_c, W_enc, b_enc, cols, kernels.row_offsets(rows, B))
    assert torch.allclose(got, (x_c @ W_enc + b_enc)[rows, cols], atol=1e-5)


def test_bf16_step_chooses_in_bf16_and_decodes_the_exact_fp32_values():
    torch.manual_seed(0)
    d, n, k, B = 32, 256, 8, 64
    sae = build_sae(SAEConfig(arch="topk", d_in=d, d_out=d, n_latents=n, k=k, in_keys=["x"], out_keys=["x"],
                              in_scales=[1.0], out_scales=[1.0]))
    sae.set_compute_dtype(torch.bfloat16)
    x = torch.randn(B, d)
    out = sae(x, x)
    with torch.no_grad():
        x_c = x - sae.b_dec
        top = torch.addmm(sae.b_enc.bfloat16(), x_c.bfloat16(), sae.W_enc.bfloat16()).topk(k + 1, dim=1)
        f = torch.zeros(B, n).scatter(1, top.indices[:, :k], 1.0) * torch.relu(x_c @ sae.W_enc + sae.b_enc)
        ref = f @ sae.W_dec + sae.b_dec
    untied = top.values[:, k - 1] > top.values[:, k]  # rows whose k-th bf16 value has no equal: one right choice
    assert int(untied.sum()) > B // 2
    assert torch.allclose(out.recon[untied], ref[untied], atol=1e-5)
    out.loss.backward()
    assert sae.W_enc_ND.grad.dtype == torch.float32 and bool(torch.isfinite(sae.W_enc_ND.grad).all())


def test_choosing_block_by_block_picks_each_rows_dense_top_k_and_auxk():
    torch.manual_seed(3)
    d, n, k, k_aux, B = 32, 256, 8, 16, 70
    sae = build_sae(SAEConfig(arch="topk", d_in=d, d_out=d, n_latents=n, k=k, k_aux=k_aux, in_keys=["x"],
                              out_keys=["x"], in_scales=[1.0], out_scales=[1.0]))
    sae.stale_tokens[::3] = sae.cfg.dead_tokens  # every third latent dead: AuxK picks among them
    sae.choose_block_rows = 16  # five blocks, the last of 6 rows
    x = torch.randn(B, d)
    with torch.no_grad():
        x_c = sae.centered(x)
        rows, cols, vals, (aux_rows, aux_cols, aux_vals) = sae.choose(x_c, with_aux=True)
        pre = x_c @ sae.W_enc + sae.b_enc
    assert torch.equal(rows, torch.arange(B).repeat_interleave(k))
    assert same_set(cols.view(B, k), pre.topk(k, dim=1).indices)
    assert torch.allclose(vals.view(B, k), pre.gather(1, cols.view(B, k)).clamp(min=0), atol=1e-6)
    dead = torch.arange(0, n, 3)
    assert torch.equal(aux_rows, torch.arange(B).repeat_interleave(k_aux))
    assert same_set(aux_cols.view(B, k_aux), dead[pre[:, dead].topk(k_aux, dim=1).indices])
    assert torch.allclose(aux_vals.view(B, k_aux), pre.gather(1, aux_cols.view(B, k_aux)).clamp(min=0), atol=1e-6)
    blocked = sae(x, x)
    sae.choose_block_rows = None  # the whole batch at once: the same step
    whole = sae(x, x)
    assert torch.allclose(blocked.loss, whole.loss) and torch.equal(blocked.fired, whole.fired)
    assert float(blocked.parts["auxk"]) > 0


def test_transpose_matmul_is_the_dense_transposed_product():
    torch.manual_seed(0)
    B, n, d = 7, 25, 4
    rows = torch.arange(B).repeat_interleave(3)
    cols = torch.randint(0, n, (rows.numel(),))
    vals = torch.randn(rows.numel(), dtype=torch.float64)
    dense = torch.randn(B, d, dtype=torch.float64)
    s = torch.zeros(B, n, dtype=torch.float64).index_put((rows, cols), vals, accumulate=True)
    for by_col in (None, kernels.column_order(cols, n)):
        assert torch.allclose(kernels.transpose_matmul(rows, cols, vals, n, dense, by_col), s.t() @ dense, atol=1e-12)
