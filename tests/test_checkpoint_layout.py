"""The encoder trains latent-major (W_enc_ND [n, d_in], contiguous, what Adam sees) while the files keep the layout
older Strata wrote: sae.safetensors holds W_enc [d_in, n] and optimizer.safetensors its Adam moments [d_in, n].
An SAE folder and a training checkpoint written that way load, encode and resume exactly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from activations import layout
from activations.errors import StrataError
from sae.checkpoint import load_sae, restore_optimizers, save_sae, write_checkpoint
from sae.config import SAEConfig
from sae.models import build_sae
from sae.optim import SAEStepper

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16


def _cfg(arch: str, n: int) -> SAEConfig:
    return SAEConfig(arch=arch, d_in=D, d_out=D, n_latents=n, k=4, in_keys=["resid.1"], out_keys=["resid.1"],
                     in_scales=[2.0], out_scales=[2.0], k_aux=D // 2, dead_tokens=64)


def _old_folder(folder, cfg: SAEConfig, g: torch.Generator) -> dict:
    """An SAE folder exactly as the old code saved it: the encoder under W_enc as [d_in, n]."""
    n = cfg.n_latents
    tensors = {"W_enc": torch.randn(D, n, generator=g), "b_enc": torch.randn(n, generator=g) * 0.1,
               "W_dec": torch.randn(n, D, generator=g), "b_dec": torch.randn(D, generator=g) * 0.1,
               "stale_tokens": torch.zeros(n, dtype=torch.int64), "fire_count": torch.zeros(n, dtype=torch.float64),
               "tokens_counted": torch.zeros((), dtype=torch.float64)}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    return tensors


@pytest.mark.parametrize("arch,n", [("topk", 64), ("topk", D), ("relu", 64)])
def test_an_sae_folder_in_the_old_layout_encodes_as_written_and_saves_back_the_same(tmp_path, arch, n):
    cfg = _cfg(arch, n)
    w = _old_folder(tmp_path / "old", cfg, torch.Generator().manual_seed(0))
    sae = load_sae(tmp_path / "old")
    assert sae.W_enc_ND.shape == (n, D) and sae.W_enc_ND.is_contiguous()
    assert torch.equal(sae.W_enc, w["W_enc"])

    x = torch.randn(32, D)
    pre = (x * 2.0 - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # the stored encoder, by its definition
    if arch == "topk":
        top = pre.topk(cfg.k, dim=1)
        want = torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp(min=0))
    else:
        want = pre.relu()
    assert torch.allclose(sae.encode(x), want, atol=1e-5)

    save_sae(sae, tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "sae.safetensors"))
    assert set(again) == set(w) and all(torch.equal(again[k], w[k]) for k in w)


def test_a_folder_without_the_statistics_loads_but_one_without_its_encoder_is_refused(tmp_path):
    w = _old_folder(tmp_path / "old", _cfg("topk", 64), torch.Generator().manual_seed(0))
    for stat in ("stale_tokens", "fire_count", "tokens_counted"):  # files from before they were saved
        del w[stat]
    save_file(w, str(tmp_path / "old" / "sae.safetensors"))
    assert torch.equal(load_sae(tmp_path / "old").W_enc, w["W_enc"])
    del w["W_enc"]
    save_file(w, str(tmp_path / "old" / "sae.safetensors"))
    with pytest.raises(StrataError, match=r"does not match its cfg.json \(missing \['W_enc'\]"):
        load_sae(tmp_path / "old")


def _stepped(cfg: SAEConfig, xs) -> tuple:
    torch.manual_seed(0)
    sae = build_sae(cfg)
    sae.init_from_sample(xs[0], xs[0])
    stepper = SAEStepper(sae, 3e-3, total_steps=100, warmup_steps=2)
    for i, x in enumerate(xs):
        stepper.step(x, x, i)
    return sae, stepper


@pytest.mark.parametrize("n", [64, D])  # D: a square encoder, where only the name tells the layouts apart
def test_a_checkpoint_keeps_the_old_moment_layout_and_resumes_bit_exact(tmp_path, n):
    cfg = _cfg("topk", n)
    xs = [torch.randn(128, D) for _ in range(6)]
    sae, stepper = _stepped(cfg, xs[:4])
    write_checkpoint(tmp_path, "r", {"resid.1": sae}, {"resid.1": stepper.opt}, {"step": 4, "tokens": 512})

    ckpt = layout.checkpoint_dir(tmp_path, "r")
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    enc_state = stepper.opt.state[sae.W_enc_ND]
    for name in ("exp_avg", "exp_avg_sq"):  # what the old code wrote: the [d_in, n] encoder's moments, row-major
        assert moments[f"resid.1/0/{name}"].shape == (D, n)
        assert torch.equal(moments[f"resid.1/0/{name}"], enc_state[name].t())

    state = json.loads((ckpt / "state.json").read_text())
    resumed = load_sae(ckpt / "saes" / "resid.1", trainable=True).train()
    again = SAEStepper(resumed, 3e-3, total_steps=100, warmup_steps=2)
    restore_optimizers(ckpt, state, {"resid.1": resumed}, {"resid.1": again.opt})
    assert again.opt.state[resumed.W_enc_ND]["exp_avg"].is_contiguous()
    for i, x in enumerate(xs[4:], start=4):
        stepper.step(x, x, i)
        again.step(x, x, i)
    for (name, a), b in zip(sae.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
