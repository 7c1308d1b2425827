"""SAE architectures on synthetic data from a known sparse dictionary: recovery, loss decrease, sparsity."""
from __future__ import annotations

import pytest
import torch

from sae.base import fvu
from sae.config import SAEConfig
from sae.kernels import gather_preacts, sparse_decode
from sae.models import build_sae
from sae.optim import SAEStepper
from sae.train import sparsity_warmup
from sae.train_config import TrainConfig

D, N_TRUE = 32, 128


pytestmark = pytest.mark.usefixtures("one_thread")


def true_dictionary(seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N_TRUE, D, generator=g)
    return w / w.norm(dim=1, keepdim=True), g


def sample(true, g, batch, active=4):
    idx = torch.rand(batch, N_TRUE, generator=g).argsort(1)[:, :active]
    f = torch.zeros(batch, N_TRUE).scatter_(1, idx, torch.rand(batch, active, generator=g) + 0.5)
    return f @ true


def cfg_for(arch, n=256, k=4, **kw):
    base = dict(arch=arch, d_in=D, d_out=D, n_latents=n, k=k, in_keys=["resid.0"], out_keys=["resid.0"],
                in_scales=[1.0], out_scales=[1.0], k_aux=D // 2, dead_tokens=20_000,
                l1_coef=5.0, l0_coef=1.0, matryoshka_prefixes=[16, 64, n], normalize_decoder=arch != "relu")
    base.update(kw)
    return SAEConfig(**base)


def train_synthetic(arch, steps=300, lr=3e-3, batch=1024, **kw):
    torch.manual_seed(0)
    true, g = true_dictionary()
    sae = build_sae(cfg_for(arch, **kw))
    x0 = sample(true, g, 4096)
    sae.init_from_sample(x0, x0)
    stepper = SAEStepper(sae, lr, total_steps=steps, warmup_steps=10)
    first = None
    for s in range(steps):
        x = sample(true, g, batch)
        out = stepper.step(x, x, s)
        first = first if first is not None else float(out.loss.detach())
    sae.eval()
    x = sample(true, g, 2048)
    with torch.no_grad():
        f = sae.encode(x)
        recon = sae.decode(f)
    return sae, true, first, float(out.loss.detach()), f, fvu(x, recon)


def test_topk_recovers_the_true_features():
    sae, true, first, last, f, err = train_synthetic("topk", steps=300, batch=512)
    w = (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).detach()
    mean_max_cos = float((w @ true.T).max(0).values.mean())
    assert mean_max_cos >= 0.9, mean_max_cos
    assert float(err) < 0.3
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.n_latents), atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu", "relu"])
def test_each_architecture_learns_and_reaches_its_sparsity(arch):
    sae, _, first, last, f, err = train_synthetic(arch, steps=150, batch=512)
    assert last < 0.75 * first, (first, last)
    l0 = float((f > 0).sum(1).float().mean())
    assert (f >= 0).all()
    if arch == "topk":
        assert l0 == 4
    elif arch in ("batchtopk", "matryoshka", "jumprelu"):  # inference threshold / learned threshold: about k
        assert 2 <= l0 <= 8, l0
    else:  # relu: the L1 penalty makes most latents silent
        assert l0 < 0.25 * sae.cfg.n_latents, l0
    assert float(err) < 0.5


def test_sparse_kernels_match_dense_autograd():
    torch.manual_seed(0)
    B, d, n, k = 16, 8, 40, 3
    x = torch.randn(B, d, dtype=torch.float64)
    W_enc = torch.randn(d, n, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(n, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(d, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, d, dtype=torch.float64)
    # dense reference: topk mask plus 2 extra "aux" picks per row, all get gradient
    pre = torch.relu((x - b_dec) @ W_enc + b_enc)
    vals, cols = pre.detach().topk(k + 2, dim=1)
    ref_f = torch.zeros_like(pre).scatter(1, cols, 1.0) * pre
    ref = ((ref_f @ W_dec - target) ** 2).sum()
    ref.backward()
    grads_ref = [t.grad.clone() for t in (W_enc, b_enc, b_dec, W_dec)]
    for t in (W_enc, b_enc, b_dec, W_dec):
        t.grad = None
    rows = torch.arange(B).repeat_interleave(k + 2)
    with torch.no_grad():
        x_c = x - b_dec
    g = gather_preacts(x_c, b_dec, W_enc, b_enc, rows, cols.reshape(-1), vals.reshape(-1))
    offsets = torch.arange(0, B * (k + 2), k + 2)
    out = ((sparse_decode(g, cols.reshape(-1), offsets, W_dec) - target) ** 2).sum()
    out.backward()
    assert torch.allclose(out, ref)
    for got, want in zip((W_enc.grad, b_enc.grad, b_dec.grad, W_dec.grad), grads_ref):
        assert torch.allclose(got, want, atol=1e-9)


def test_auxk_trains_dead_latents_encoders():
    sae = build_sae(cfg_for("topk", n=64, k=2, dead_tokens=1))
    sae.stale_tokens.fill_(10)  # everything counts as dead
    x = torch.randn(32, D)
    out = sae(x, x)
    out.loss.backward()
    assert "auxk" in out.parts
    touched = (sae.W_enc_ND.grad.abs().sum(1) > 0).sum()
    assert touched > int((out.fired > 0).sum())  # aux picks beyond the top-k got encoder gradient


def test_raw_units_api_applies_the_normalisation():
    torch.manual_seed(0)
    sae = build_sae(cfg_for("topk", in_scales=[0.5], out_scales=[0.5])).eval()
    x = torch.randn(8, D) * 2
    plain = build_sae(cfg_for("topk")).eval()
    plain.load_state_dict(sae.state_dict())
    assert torch.allclose(sae.encode(x), plain.encode(x * 0.5))
    assert torch.allclose(sae.reconstruct(x), plain.reconstruct(x * 0.5) / 0.5, atol=1e-5)


def test_decoder_stays_unit_norm_and_gradient_is_tangent():
    sae = build_sae(cfg_for("topk"))
    x = torch.randn(64, D)
    sae(x, x).loss.backward()
    sae.remove_parallel_grad()
    assert float((sae.W_dec.grad * sae.W_dec).sum(1).abs().max()) < 1e-6


def test_gradients_are_clipped_to_the_limit_only_when_over_it():
    """grad_clip bounds the global gradient norm before Adam: an over-limit gradient is scaled down to the limit
    (same direction), one under it is left exactly as it is."""
    true, g = true_dictionary()
    x = sample(true, g, 256)

    def grads_after_a_step(clip):
        torch.manual_seed(0)
        sae = build_sae(cfg_for("topk"))
        SAEStepper(sae, 1e-3, total_steps=10, grad_clip=clip).step(x, x, 0)
        return torch.cat([p.grad.flatten() for p in sae.parameters() if p.grad is not None])

    free = grads_after_a_step(0.0)  # 0: no clipping
    norm = float(free.norm())
    clipped = grads_after_a_step(norm / 10)
    assert float(clipped.norm()) == pytest.approx(norm / 10, rel=1e-4)
    assert torch.allclose(clipped * 10, free, rtol=1e-4, atol=1e-9)
    assert torch.equal(grads_after_a_step(norm * 10), free)


def test_sparsity_penalties_warm_up_as_configured():
    """ReLU's L1 weight ramps (step + 1) / W over SAEStepper's sparsity_warmup_steps; `strata train` sets W to
    --l1-warmup-steps (default 5% of the steps) for ReLU, the whole run for the CLT tanh penalty, nothing else."""
    torch.manual_seed(0)
    sae = build_sae(cfg_for("relu", l1_coef=5.0))
    stepper = SAEStepper(sae, 1e-3, total_steps=10, sparsity_warmup_steps=4)
    x = torch.randn(128, D)
    for step in range(6):
        out = stepper.step(x, x, step)
        weight = (out.loss.detach() - out.parts["recon"]) / (5.0 / D * out.parts["l1"])
        assert float(weight) == pytest.approx(min(1.0, (step + 1) / 4), rel=1e-4), step
    cfg = TrainConfig(run_dir="unused")
    assert sparsity_warmup(cfg, cfg_for("relu"), 200) == 10
    assert sparsity_warmup(TrainConfig(run_dir="unused", l1_warmup_steps=7), cfg_for("relu"), 200) == 7
    clt = SAEConfig(arch="jumprelu", mode="clt", sparsity="tanh", d_in=8, d_out=8, n_latents=8, in_keys=["a"],
                    out_keys=["b"], in_scales=[1.0], out_scales=[1.0])
    assert sparsity_warmup(cfg, clt, 200) == 200
    assert sparsity_warmup(TrainConfig(run_dir="unused", tanh_warmup_steps=1), clt, 200) == 1
    assert sparsity_warmup(cfg, cfg_for("topk"), 200) == 0 and sparsity_warmup(cfg, cfg_for("jumprelu"), 200) == 0
