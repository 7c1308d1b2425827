"""`strata import` of SAELens folders that need more than copying weights: TopK SAEs saved with
`rescale_acts_by_decoder_norm: true` (SAELens 6.x's training default) and SAEs whose inputs SAELens scaled by a
stored scalar (`normalize_activations: expected_average_only_in` + activation_scaler.json). The imported SAE must
encode and reconstruct exactly as SAELens' definition (sae/saelens_read.py), written out here as formulas; and
as the real SAELens where it is installed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from activations import layout
from activations.lock import run_lock
from activations.ownership import owner_kind
from activations.reader import open_run
from sae.checkpoint import load_saes
from strata.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
D, N, K = 32, 96, 8


def strata(*args) -> int:
    return main([str(a) for a in args])


def acts(run, n: int = 300) -> torch.Tensor:
    return torch.from_numpy(open_run(run).read_rows("resid.1", list(range(40, 40 + n)))).float()


def saelens_folder(folder: Path, arch: str, seed: int = 0, scaler: float | None = None, **cfg_fields) -> dict:
    """A SAELens SAE folder as SAELens 6.x saves one (cfg.json + sae_weights.safetensors), random weights whose
    decoder rows have very different norms (as a SAE trained with decoder-norm rescaling has)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(N, D, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * (0.2 + 3 * torch.rand(N, 1, generator=g))
    w = {"W_enc": torch.randn(D, N, generator=g) * 0.4, "W_dec": W_dec, "b_enc": torch.randn(N, generator=g) * 0.1,
         "b_dec": torch.randn(D, generator=g) * 0.05}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(N, generator=g) * 0.5
    cfg = {"architecture": arch, "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_pre", "context_size": 32}}
    if arch == "topk":
        cfg["k"] = K
    cfg.update(cfg_fields)
    folder.mkdir(parents=True)
    save_file(w, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    if scaler is not None:
        (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": scaler}))
    return w


def saelens_encode(w: dict, x: torch.Tensor, arch: str, rescale: bool = False, scale: float = 1.0) -> torch.Tensor:
    """SAELens 6.x encode, from its definition: pre = (s x - b_dec) W_enc + b_enc (times ||W_dec[i]|| when
    rescaling), then relu (standard), relu with pre > threshold (jumprelu) or the k largest, relu'd (topk)."""
    pre = (x * scale - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if rescale:
        pre = pre * w["W_dec"].norm(dim=1)
    if arch == "topk":
        vals, idx = pre.topk(K, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, vals.relu())
    if arch == "jumprelu":
        return pre.relu() * (pre > w["threshold"])
    return pre.relu()


def saelens_decode(w: dict, f: torch.Tensor, rescale: bool = False, scale: float = 1.0) -> torch.Tensor:
    """SAELens decode: (f / ||W_dec[i]|| when rescaling) W_dec + b_dec, back to raw units by 1 / s."""
    if rescale:
        f = f / w["W_dec"].norm(dim=1)
    return (f @ w["W_dec"] + w["b_dec"]) / scale


def test_topk_with_decoder_norm_rescaling_is_folded_exactly(run, tmp_path):
    w = saelens_folder(tmp_path / "topk", "topk", rescale_acts_by_decoder_norm=True)
    assert strata("import", run, tmp_path / "topk", "--name", "lens") == 0
    sae = load_saes(run, "lens")["resid.1"]
    x = acts(run)
    want = saelens_encode(w, x, "topk", rescale=True)
    got = sae.encode(x)
    assert torch.equal(got > 0, want > 0), "the same latents fire on every token"
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sae.decode(got), saelens_decode(w, want, rescale=True), rtol=1e-5, atol=1e-5)
    assert torch.allclose(sae.reconstruct(x), saelens_decode(w, want, rescale=True), rtol=1e-5, atol=1e-5)
    # the folded decoder has unit rows, and the imported cfg says what was folded
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(N), atol=1e-6)
    cfg = json.loads((layout.checkpoint_dir(run, "lens") / "saes" / "resid.1" / "cfg.json").read_text())
    assert cfg["imported"]["format"] == "saelens" and "rescale_acts_by_decoder_norm" in cfg["imported"]["folded"][0]
    # ignoring the rescaling would pick other latents: the fold is what makes them agree
    assert not torch.equal(saelens_encode(w, x, "topk") > 0, want > 0)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_stored_input_scalar_becomes_the_input_scale(run, tmp_path, arch):
    s = 0.37
    extra = {"rescale_acts_by_decoder_norm": True} if arch == "topk" else {}
    w = saelens_folder(tmp_path / arch, arch, seed=1, scaler=s, normalize_activations="expected_average_only_in", **extra)
    assert strata("import", run, tmp_path / arch, "--name", f"s-{arch}") == 0
    sae = load_saes(run, f"s-{arch}")["resid.1"]
    x = acts(run)
    want = saelens_encode(w, x, arch, rescale=bool(extra), scale=s)
    got = sae.encode(x)
    assert 0 < float((want > 0).float().sum(1).mean()) < N, "a sparse code, not all or nothing"
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sae.reconstruct(x), saelens_decode(w, want, rescale=bool(extra), scale=s), rtol=1e-5, atol=1e-5)
    assert sae.cfg.in_scales == [s] and sae.cfg.out_scales == [s]
    assert any("expected_average_only_in" in line for line in sae.cfg.imported["folded"])
    # the export folds the scalar into SAELens weights and `strata import` reads it back unchanged
    assert strata("export", run, "--name", f"s-{arch}", "--out", tmp_path / "again") == 0
    assert strata("import", run, tmp_path / "again" / "resid.1", "--name", f"again-{arch}") == 0
    back = load_saes(run, f"again-{arch}")["resid.1"]
    assert torch.allclose(back.encode(x), got, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm,why", [("layer_norm", "own mean and std"), ("constant_norm_rescale", "own norm")])
def test_per_token_normalisation_is_refused_saying_why(run, tmp_path, capsys, norm, why):
    saelens_folder(tmp_path / norm, "standard", normalize_activations=norm)
    assert strata("import", run, tmp_path / norm, "--name", "pt") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err and "not a linear map" in err
    assert not layout.train_dir(run, "pt").exists()


def test_imported_folder_is_strata_training_folder_and_locked_while_written(run, tmp_path, capsys):
    saelens_folder(tmp_path / "a", "standard")
    with run_lock(run, "strata train --name busy", scope="train-busy"):
        assert strata("import", run, tmp_path / "a", "--name", "busy") == 2
    assert "in use by `strata train --name busy`" in capsys.readouterr().err
    assert not layout.train_dir(run, "busy").exists()
    assert strata("import", run, tmp_path / "a", "--name", "busy") == 0
    assert owner_kind(layout.train_dir(run, "busy")) == "train"
    assert strata("eval", run, "--name", "busy", "--batch-size", "256", "--ce-contexts", "0", "--device", "cpu") == 0


def test_real_saelens_agrees_when_installed(run, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    x = acts(run)
    s = 0.37
    cases = [("topk", None, {"rescale_acts_by_decoder_norm": True}),
             ("jumprelu", s, {"normalize_activations": "expected_average_only_in"}),
             ("standard", s, {"normalize_activations": "expected_average_only_in"})]
    for arch, scaler, extra in cases:
        folder = tmp_path / arch
        saelens_folder(folder, arch, seed=2, scaler=scaler, **extra)
        theirs = sae_lens.SAE.load_from_disk(str(folder))
        if scaler is not None:
            theirs.fold_activation_norm_scaling_factor(scaler)  # what SAELens does with the stored scalar
        assert strata("import", run, folder, "--name", f"real-{arch}") == 0
        ours = load_saes(run, f"real-{arch}")["resid.1"]
        with torch.no_grad():
            assert torch.allclose(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5), arch
            assert torch.allclose(ours.reconstruct(x), theirs.decode(theirs.encode(x)), rtol=1e-5, atol=1e-4), arch
