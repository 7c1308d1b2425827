"""Cross-layer transcoders (`strata train RUN --mode clt`): training, the planted cross-layer feature, checkpoint and
bit-exact resume, eval with every MLP replaced at once, and the raw-unit API attribution graphs use."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from activations import layout
from activations.errors import StrataError
from sae.base import FVU
from sae.checkpoint import load_saes
from sae.circuits.adapter import TranscoderSet
from sae.clt import CrossLayerTranscoder, check_fits, size_plan
from sae.config import SAEConfig
from sae.models import build_sae
from sae.optim import SAEStepper
from strata.cli import main

FAST = ["--batch-size", "256", "--expansion", "4", "--k", "8", "--progress", "false", "--device", "cpu"]
pytestmark = pytest.mark.usefixtures("one_thread")


def strata(*args) -> int:
    return main([str(a) for a in args])


def records(run, name) -> list[dict]:
    return [json.loads(ln) for ln in layout.metrics_path(run, name).read_text().splitlines()]


def copy_run(tiny_run, dest: Path) -> Path:
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("train", "index", "share", ".locks", ".strata.lock"))
    return dest


def clt_config(L=3, d=16, n=32, k=3, arch="topk", k_aux=0, **kw) -> SAEConfig:
    return SAEConfig(arch=arch, d_in=L * d, d_out=L * d, n_latents=L * n, k=k, mode="clt",
                     in_keys=[f"mlp_in.{i}" for i in range(L)], out_keys=[f"mlp_out.{i}" for i in range(L)],
                     in_scales=[1.0] * L, out_scales=[1.0] * L, apply_b_dec_to_input=False, normalize_decoder=False,
                     k_aux=k_aux, l0_coef=1.0, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run) -> Path:
    """A copy of the tiny harvest (mlp_in/mlp_out 0-2) with a TopK CLT "clt" and a per-layer transcoder set "tc"."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = copy_run(tiny_run, tmp_path_factory.mktemp("clt") / "run")
        assert strata("train", run, "--mode", "clt", "--name", "clt", "--epochs", "2", "--log-every", "5", *FAST) == 0
        assert strata("train", run, "--mode", "transcoder", "--name", "tc", "--epochs", "2", *FAST) == 0
    finally:
        torch.set_num_threads(threads)
    return run


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_clt_trains_with_each_sparsity(tmp_path, tiny_run, arch, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    assert strata("train", run, "--mode", "clt", "--arch", arch, "--epochs", "2", "--log-every", "5", *FAST) == 0
    assert "clt: 3 layers x 128 latents" in capsys.readouterr().out  # size printed at the start
    recs = [r["saes"]["clt"] for r in records(run, f"{arch}-clt")]
    assert recs[-1]["loss"] < recs[0]["loss"] and recs[-1]["fvu"] < recs[0]["fvu"]
    sae = load_saes(run, f"{arch}-clt")["clt"]
    assert isinstance(sae, CrossLayerTranscoder) and sae.cfg.arch == arch


def test_clt_loss_falls_and_reports_each_output_layer(trained, capsys):
    recs = [r["saes"]["clt"] for r in records(trained, "clt")]
    assert recs[-1]["fvu"] < 0.8 * recs[0]["fvu"]
    assert recs[-1]["l0"] == 3 * 8  # k active latents per layer
    for t in range(3):
        assert 0 < recs[-1][f"fvu/mlp_out.{t}"] < 1
    sae = load_saes(trained, "clt")["clt"]
    assert sae.cfg.in_keys == ["mlp_in.0", "mlp_in.1", "mlp_in.2"]
    assert sae.cfg.out_keys == ["mlp_out.0", "mlp_out.1", "mlp_out.2"]
    plan = size_plan(3, 32, 128)
    assert sum(p.numel() for p in sae.parameters()) == plan["params"]
    assert [tuple(w.shape) for w in sae.W_dec_from] == [(128, 3, 32), (128, 2, 32), (128, 1, 32)]  # target >= source
    full = sae.W_dec  # one row per latent over the three mlp_out blocks, nothing written to earlier layers
    assert full.shape == (3 * 128, 3 * 32) and not full[128:, :32].any() and not full[256:, :64].any()
    f = torch.relu(torch.randn(4, 3 * 128))
    torch.testing.assert_close(sae.decode_n(f), f @ full + sae.b_dec.reshape(1, -1))


def test_sparse_training_step_equals_dense_autograd():
    """The TopK forward (sparse gather + embedding-bag decode) has the gradients of the plain dense formula."""
    torch.manual_seed(0)
    cfg = clt_config()
    clt = build_sae(cfg)
    with torch.no_grad():
        for w in clt.W_dec_from:
            w.normal_(0, 0.2)
        clt.b_enc.normal_(0, 0.1)
    x, y = torch.randn(64, 48), torch.randn(64, 48)
    loss_fn = FVU(blocks=3, dim=1, reduce="sum")
    clt(x, y, loss_fn).loss.backward()
    sparse = {k: p.grad.clone() for k, p in clt.named_parameters()}
    clt.zero_grad()
    pre = clt.preacts(x)
    f = []
    for s in range(3):
        vals, idx = pre[s].detach().topk(cfg.k, dim=1)
        f.append(torch.zeros_like(pre[s]).scatter(1, idx, pre[s].gather(1, idx).clamp(min=0)))
    loss_fn(y, clt.decode_n(torch.cat(f, 1))).backward()
    for k, p in clt.named_parameters():
        torch.testing.assert_close(sparse[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


# ---------------------------------------------------------------- planted cross-layer feature
def _unit(*shape, g):
    v = torch.randn(*shape, generator=g)
    return v / v.norm(dim=-1, keepdim=True)


def _toy_batch(B, dirs, g, prob=0.15):
    """mlp_in/mlp_out of 3 layers: 8 single-layer features per layer, plus one feature read at mlp_in.0 that
    writes planted directions into mlp_out.0, .1 and .2 (absent from mlp_in.1 and .2)."""
    u_in, u_out, p_in, p_out = dirs
    L, m, d = u_in.shape
    a = (torch.rand(B, L, m, generator=g) < prob) * (0.5 + torch.rand(B, L, m, generator=g))
    ap = (torch.rand(B, generator=g) < prob) * (0.5 + torch.rand(B, generator=g))
    x_in = torch.einsum("blm,lmd->bld", a, u_in)
    y_out = torch.einsum("blm,lmd->bld", a, u_out) + ap[:, None, None] * p_out[None]
    x_in[:, 0] += ap[:, None] * p_in
    return x_in.reshape(B, L * d), y_out.reshape(B, L * d)


def test_clt_recovers_a_planted_cross_layer_feature():
    g = torch.Generator().manual_seed(0)
    L, d, n = 3, 16, 32
    dirs = (_unit(L, 8, d, g=g), _unit(L, 8, d, g=g), _unit(d, g=g), _unit(L, d, g=g))
    clt = build_sae(clt_config(L, d, n, k=3, k_aux=8, dead_tokens=2000))
    clt.reset_parameters(torch.Generator().manual_seed(1))
    clt.init_from_sample(*_toy_batch(4096, dirs, g), "mean")
    stepper = SAEStepper(clt, 1e-2, 300, 10, 0.2, 1.0)
    loss_fn = FVU(blocks=L, dim=1, reduce="sum")
    first = None
    for step in range(300):
        out = stepper.step(*_toy_batch(256, dirs, g), step, loss_fn)
        first = first if first is not None else float(out.parts["recon"])
    assert float(out.parts["recon"]) < 0.1 * first
    with torch.no_grad():
        cos = torch.stack([F.cosine_similarity(clt.decoder_vectors(0, t, range(n)), dirs[3][t][None], dim=1)
                           for t in range(L)])  # [target layer, latent of layer 0]
        best = int(cos.min(0).values.argmax())
        assert (cos[:, best] >= 0.9).all(), cos[:, best]
        # it fires on the planted input alone, and only that latent's decoders carry it to the later layers
        x = torch.zeros(1, L * d)
        x[0, :d] = dirs[2]
        acts = clt.encode_layer(0, x[:, :d])
        assert int(acts[0].argmax()) == best
        for t in (1, 2):
            got = clt.decode_to(t, {0: acts}) - clt.decode_to(t, {})
            assert F.cosine_similarity(got[0], dirs[3][t], dim=0) >= 0.9


# ---------------------------------------------------------------- the paper's tanh sparsity penalty
def test_tanh_penalty_is_the_papers_formula():
    """loss = sum of per-layer FVU + ramp * lambda * mean over tokens of sum_(s,i) tanh(c a_si ||W_dec,si||), the norm
    taken over latent i's decoders to every layer it writes, + lambda_P / d * mean over tokens of
    sum_(s,i) ReLU(theta_si - h_si) ||W_dec,si|| (the pre-activation loss); the thresholds get the penalty's gradient
    through the straight-through estimator, and only pre-activations below their thresholds get the second's."""
    torch.manual_seed(0)
    clt = build_sae(clt_config(arch="jumprelu", sparsity="tanh", tanh_coef=0.3, tanh_c=2.0, pre_act_coef=0.05))
    with torch.no_grad():
        for w in clt.W_dec_from:
            w.normal_(0, 0.2)
        clt.log_threshold.fill_(-1.0)
    x, y = torch.randn(64, 48), torch.randn(64, 48)
    loss_fn = FVU(blocks=3, dim=1, reduce="sum")
    out = clt(x, y, loss_fn, sparsity_scale=0.25)
    with torch.no_grad():
        pre = clt.preacts(x)  # [L, B, n]
        theta = clt.log_threshold.exp()[:, None, :]
        a = pre * (pre > theta)
        expect, below = 0.0, 0.0
        for s in range(3):
            norms = torch.cat([clt.W_dec_from[s][:, t] for t in range(3 - s)], 1).norm(dim=1)  # concatenated decoders
            expect = expect + torch.tanh(2.0 * a[s] * norms).sum(1)
            below = below + ((theta[s] - pre[s]).clamp(min=0) * norms).sum(1)
        expect, below = expect.mean(), below.mean()
    assert "l0_penalty" not in out.parts and float(out.l0) > 0
    torch.testing.assert_close(out.parts["tanh_penalty"], expect)
    torch.testing.assert_close(out.parts["pre_act_loss"], below)
    torch.testing.assert_close(out.loss.detach(), out.parts["recon"] + 0.25 * 0.3 * expect + 0.05 / 16 * below)
    out.loss.backward()
    assert clt.log_threshold.grad.abs().sum() > 0 and all(w.grad.abs().sum() > 0 for w in clt.W_dec_from)


def test_the_tanh_penalty_ramps_up_over_the_warmup():
    """SAEStepper(sparsity_warmup_steps=W) weighs the penalty (step + 1) / W until W, then fully, as `strata train`
    does over the whole run by default (Anthropic's schedule)."""
    torch.manual_seed(0)
    clt = build_sae(clt_config(arch="jumprelu", sparsity="tanh", tanh_coef=0.3))
    with torch.no_grad():
        for w in clt.W_dec_from:
            w.normal_(0, 0.2)
        clt.log_threshold.fill_(-1.0)
    stepper = SAEStepper(clt, 1e-3, total_steps=8, sparsity_warmup_steps=4)
    loss_fn = FVU(blocks=3, dim=1, reduce="sum")
    x, y = torch.randn(64, 48), torch.randn(64, 48)
    for step in range(6):
        out = stepper.step(x, y, step, loss_fn)
        weight = (out.loss.detach() - out.parts["recon"]) / (0.3 * out.parts["tanh_penalty"])
        assert float(weight) == pytest.approx(min(1.0, (step + 1) / 4), rel=1e-4), step


def test_the_pre_activation_loss_brings_dead_latents_back():
    """A CLT trains 40 steps, then its thresholds jump x20 (log +3) and most latents die. Trained on for 120 steps,
    without the pre-activation loss few come back and the reconstruction stays broken; with it the pre-activations
    climb back to the thresholds, (nearly) every latent fires again and the FVU recovers."""
    L, d, n = 3, 16, 32
    g = torch.Generator().manual_seed(0)
    dirs = (_unit(L, 8, d, g=g), _unit(L, 8, d, g=g), _unit(d, g=g), _unit(L, d, g=g))
    batches = [_toy_batch(256, dirs, g) for _ in range(160)]
    loss_fn = FVU(blocks=L, dim=1, reduce="sum")
    alive, fvus = [], []
    for coef in (0.0, 3.0):
        clt = build_sae(clt_config(L, d, n, k=8, arch="jumprelu", sparsity="tanh", tanh_coef=0.01, pre_act_coef=coef))
        clt.reset_parameters(torch.Generator().manual_seed(1))
        clt.init_from_sample(*_toy_batch(2048, dirs, torch.Generator().manual_seed(2)), "mean")
        stepper = SAEStepper(clt, 1e-2, len(batches), 10, 0.2, 1.0)
        fired = torch.zeros(L * n)
        for step, (x, y) in enumerate(batches):
            if step == 40:
                with torch.no_grad():
                    clt.log_threshold.add_(3.0)
            out = stepper.step(x, y, step, loss_fn)
            if step >= len(batches) - 20:
                fired += out.fired
        alive.append(int((fired > 0).sum()))
        fvus.append(float(out.parts["recon"]))
    assert alive[0] <= L * n // 2 and alive[1] >= 0.9 * L * n, alive
    assert fvus[1] < 0.5 * fvus[0], fvus


def test_clt_trains_with_the_tanh_penalty(tmp_path, tiny_run):
    run = copy_run(tiny_run, tmp_path / "run")
    assert strata("train", run, "--mode", "clt", "--arch", "jumprelu", "--sparsity", "tanh", "--tanh-coef", "0.01",
                  "--name", "t", "--epochs", "2", "--log-every", "5", *FAST) == 0
    recs = [r["saes"]["clt"] for r in records(run, "t")]
    assert recs[-1]["loss"] < recs[0]["loss"] and recs[-1]["fvu"] < recs[0]["fvu"]
    assert "tanh_penalty" in recs[-1] and "pre_act_loss" in recs[-1] and "l0_penalty" not in recs[-1]
    cfg = load_saes(run, "t")["clt"].cfg
    assert (cfg.sparsity, cfg.tanh_coef, cfg.tanh_c, cfg.l0_coef, cfg.pre_act_coef) == ("tanh", 0.01, 1.0, 0.0, 3e-6)


# ---------------------------------------------------------------- checkpoint, resume
class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("sparsity", [[], ["--arch", "jumprelu", "--sparsity", "tanh", "--tanh-coef", "0.01"]],
                         ids=["topk", "jumprelu-tanh"])
def test_interrupted_clt_resumes_bit_exact(tmp_path, tiny_run, monkeypatch, sparsity):
    flags = ["--mode", "clt", "--name", "r", "--epochs", "2", "--batch-size", "128", "--expansion", "4", "--k", "8",
             "--progress", "false", "--device", "cpu", "--checkpoint-every", "4", "--precision", "fp32", *sparsity]
    ref = copy_run(tiny_run, tmp_path / "ref")
    assert strata("train", ref, *flags) == 0
    run = copy_run(tiny_run, tmp_path / "run")
    real_step, calls = SAEStepper.step, {"n": 0}

    def step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 11:
            raise _Interrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(SAEStepper, "step", step)
    with pytest.raises(_Interrupt):
        strata("train", run, *flags)
    state = json.loads((layout.checkpoint_dir(run, "r") / "state.json").read_text())
    assert state["step"] == 8 and not state["done"]
    monkeypatch.setattr(SAEStepper, "step", real_step)
    assert strata("train", run, *flags, "--resume") == 0
    for rel in ("saes/clt/sae.safetensors", "optimizer.safetensors", "saes/clt/cfg.json"):
        a, b = (layout.checkpoint_dir(r, "r") / rel for r in (run, ref))
        assert a.read_bytes() == b.read_bytes(), rel


# ---------------------------------------------------------------- eval, loading, API
def test_eval_replaces_every_mlp_at_once(trained, capsys):
    assert strata("eval", trained, "--name", "clt", "--batch-size", "256", "--ce-contexts", "4", "--device", "cpu") == 0
    printed = capsys.readouterr().out
    assert "every MLP replaced at once (layers [0, 1, 2])" in printed
    r = json.loads((layout.train_dir(trained, "clt") / "eval.json").read_text())["saes"]["clt"]
    for t in range(3):  # per-layer FVU of each MLP output, and that output spliced alone
        m = r["per_key"][f"mlp_out.{t}"]
        assert 0 < m["fvu"] < 1 and "ce_loss_recovered" in m
    every = r["all_mlps"]
    assert every["layers"] == [0, 1, 2]
    assert every["ce_zero"] != every["ce_clean"] and every["kl_replaced"] >= 0
    assert r["overall"]["ce_loss_recovered_all_mlps"] == every["ce_loss_recovered"]

    assert strata("eval", trained, "--name", "tc", "--batch-size", "256", "--ce-contexts", "4", "--device", "cpu") == 0
    tc = json.loads((layout.train_dir(trained, "tc") / "eval.json").read_text())["saes"]
    assert sorted(tc) == ["transcoder.0", "transcoder.1", "transcoder.2"]
    assert tc["transcoder.0"]["all_mlps"] == tc["transcoder.2"]["all_mlps"]  # one set, replaced together
    assert tc["transcoder.0"]["all_mlps"]["layers"] == [0, 1, 2]


def test_replaced_forward_with_exact_mlps_reproduces_the_model(tiny_llama):
    """The wiring of the every-MLP eval: each layer's encoder sees mlp_in as the replaced layers before it left
    it. With "features" that are the real MLP the logits are the clean ones; with zeroed MLPs they are not."""
    from activations.model import load_model
    from sae.evals.core import _keep_first, replaced_forward

    model = load_model(str(tiny_llama), torch.device("cpu"), torch.float32).model
    mlps = {i: layer.mlp for i, layer in enumerate(model.model.layers)}

    class ExactMLPs:
        def encode_layer(self, layer, x):
            return x

        def decode_to(self, layer, acts):  # the MLP's own formula (calling the module would re-enter its hook)
            m = mlps[layer]
            return m.down_proj(m.act_fn(m.gate_proj(acts[layer])) * m.up_proj(acts[layer]))

    ids = torch.randint(0, 300, (2, 16))
    clean = model(ids).logits
    got = replaced_forward(model, ids, ExactMLPs(), sorted(mlps), _keep_first(0))
    torch.testing.assert_close(got, clean, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(replaced_forward(model, ids, None, sorted(mlps), _keep_first(0)), clean, atol=1e-3)


def test_loaded_clt_raw_api_agrees_with_reconstruct(trained):
    from activations.reader import open_run

    clt = load_saes(trained, "clt")["clt"]
    store = open_run(trained)
    rows = list(range(100, 164))
    xs = {t: torch.from_numpy(store.read_rows(f"mlp_in.{t}", rows)) for t in range(3)}
    with torch.no_grad():
        whole = clt.reconstruct(torch.cat([xs[t] for t in range(3)], 1))
        acts = {t: clt.encode_layer(t, xs[t]) for t in range(3)}
        assert all(acts[t].shape == (64, 128) and ((acts[t] > 0).sum(1) <= 8).all() for t in range(3))
        for t in range(3):
            torch.testing.assert_close(clt.decode_to(t, acts), whole[:, 32 * t:32 * (t + 1)], rtol=1e-4, atol=1e-4)
            y = torch.from_numpy(store.read_rows(f"mlp_out.{t}", rows))
            assert float(((clt.decode_to(t, acts) - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()) < 1
        # a latent's contribution is its activation times its decoder vector (raw units)
        i = int(acts[0][0].argmax())
        one = {0: torch.zeros(1, 128)}
        one[0][0, i] = 2.0
        torch.testing.assert_close(clt.decode_to(2, one) - clt.decode_to(2, {}), 2.0 * clt.decoder_vectors(0, 2, [i]))
    with pytest.raises(StrataError, match="writes only to layers >= 1"):
        clt.decoder_vectors(1, 0, [0])


def test_transcoder_set_has_the_same_api(trained):
    saes = load_saes(trained, "tc")
    bank = TranscoderSet(saes)
    x = torch.randn(5, 32)
    with torch.no_grad():
        acts = bank.encode_layer(1, x)
        torch.testing.assert_close(bank.decode_to(1, {1: acts, 0: torch.ones(5, 128)}),
                                   saes["transcoder.1"].reconstruct(x))  # other layers' latents do not write here
        torch.testing.assert_close(bank.decoder_vectors(1, 1, [3]), saes["transcoder.1"].decode(torch.eye(128)[3:4])
                                   - saes["transcoder.1"].decode(torch.zeros(1, 128)))
    assert bank.decoder_vectors(0, 1, [0]) is None  # a per-layer transcoder writes only into its own layer


def test_export_and_oversized_clt_are_refused(trained, tmp_path):
    from sae.saelens import export_saelens

    with pytest.raises(StrataError, match="no folder format for our clt"):
        export_saelens(trained, "clt", tmp_path / "out")
    with pytest.raises(StrataError, match="lower --expansion or --n-latents, or train fewer --layers"):
        check_fits(30, 4096, 2**20, "topk", "cpu")


def test_analyze_indexes_a_clt_latent_per_row(trained):
    import h5py

    assert strata("analyze", trained, "--name", "clt", "--device", "cpu", "--progress", "false") == 0
    with h5py.File(layout.index_path(trained, "clt"), "r") as f:
        g = f["saes/clt"]
        assert g["frequency"].shape == (3 * 128,)
        nb = g["neighbour_idx"][:]
        assert nb.shape[0] == 3 * 128 and nb.max() < 3 * 128
