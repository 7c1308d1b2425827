"""The core suite: reconstruction and sparsity on the held-out shards, and the downstream cost of splicing each
SAE into the model.

Per SAE and per key: FVU / explained variance, MSE (raw units), cosine, shrinkage, relative reconstruction
bias, L0, alive/dead/dense fractions (sae/metrics.py); then the SAE is spliced into the model at its key
(activations.hooks.splice) on held-out contexts and compared with the clean forward and with zero-ablation of
that key:
    CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean);  KL recovered = (KL_zero - KL_sae) / KL_zero
with KL(p_clean || p) averaged over predicted tokens.

Replacement of every MLP at once (a CLT, or the run's per-layer transcoders as a set): the model runs with each
covered layer's MLP output replaced by the reconstruction from the features of that forward (the encoder of
layer L reads mlp_in.L as the replaced layers before it left it), compared with the clean forward and with all
those MLP outputs zeroed: ce_loss_recovered_all_mlps / kl_recovered_all_mlps (same formulas).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from activations.errors import StrataError
from activations.reader import ActivationReader
from activations.synth import is_synthetic
from sae.evals.suite import SuiteContext
from sae.metrics import LatentStats, ReconStats
from sae.modes import Unit


@torch.no_grad()
def run(ctx: SuiteContext) -> dict:
    saes = reconstruction_metrics(ctx.run, ctx.saes, ctx.heldout, ctx.cfg, ctx.device)
    if ctx.cfg.ce_contexts > 0 and is_synthetic(ctx.run.manifest.model):
        print("eval: synthetic run (strata synth): no model, so no CE/KL loss recovered")
    elif ctx.cfg.ce_contexts > 0:
        for sid, per_key in downstream_metrics(ctx.run, ctx.saes, ctx.heldout, ctx.cfg, ctx.device, ctx.dtype).items():
            saes[sid]["downstream"] = per_key
            for key, m in per_key.items():
                saes[sid]["per_key"].setdefault(key, {}).update(m)
            saes[sid]["overall"]["ce_loss_recovered"] = float(np.mean([m["ce_loss_recovered"] for m in per_key.values()]))
            saes[sid]["overall"]["kl_recovered"] = float(np.mean([m["kl_recovered"] for m in per_key.values()]))
        for sid, m in all_mlps_metrics(ctx.run, ctx.saes, ctx.heldout, ctx.cfg, ctx.device, ctx.dtype).items():
            saes[sid]["all_mlps"] = m
            saes[sid]["overall"]["ce_loss_recovered_all_mlps"] = m["ce_loss_recovered"]
            saes[sid]["overall"]["kl_recovered_all_mlps"] = m["kl_recovered"]
    return {"saes": saes}


@torch.no_grad()
def reconstruction_metrics(run, saes: dict, heldout: list[int], cfg, device) -> dict:
    units = [Unit(sid, sae) for sid, sae in saes.items()]
    keys = sorted({k for u in units for k in u.needed_keys})
    reader = ActivationReader(run, keys, cfg.batch_size, shards=heldout, shuffle=False,
                              exclude_first=cfg.exclude_first)
    recon = {u.sae_id: {} for u in units}
    lat = {u.sae_id: LatentStats(u.sae.cfg.n_latents) for u in units}
    seen = 0
    for batch in reader:
        acts = {k: v.to(device) for k, v in batch.acts.items()}
        for u in units:
            x, y = u.io(acts)
            f = u.sae.encode_n(x)
            r = u.sae.decode_n(f) + u.sae.skip_out(x)
            lat[u.sae_id].update_dense(f)
            scale = dict(zip(u.out_keys, u.sae.cfg.out_scales))
            for key, (yk, rk) in u.parts(y, r).items():  # back to raw units, per key
                recon[u.sae_id].setdefault(key, ReconStats()).update(yk / scale[key], rk / scale[key])
        seen += batch.rows.numel()
        if cfg.max_tokens and seen >= cfg.max_tokens:
            break
    out = {}
    for u in units:
        per_key = {k: s.summary() for k, s in recon[u.sae_id].items()}
        summary = {m: float(np.mean([v[m] for v in per_key.values()])) for m in next(iter(per_key.values()))}
        summary.update(lat[u.sae_id].summary())
        out[u.sae_id] = {"overall": summary, "per_key": per_key, "tokens": seen,
                         "log10_density": torch.log10(lat[u.sae_id].density() + 1e-10).tolist()}
    return out


def _contexts(run, heldout: list[int], n: int) -> torch.Tensor:
    T = run.manifest.context_length
    ids = []
    for s in heldout:
        rec = run.manifest.shards[s]
        toks = run.read_tokens(rec.token_start, rec.token_start + rec.rows)["token_ids"]
        usable = len(toks) // T * T
        ids.append(toks[:usable].reshape(-1, T))
    ids = np.concatenate(ids)[:n]
    return torch.from_numpy(ids.astype(np.int64))


def _ce_kl(logits: torch.Tensor, ids: torch.Tensor, clean_logp: torch.Tensor) -> tuple[float, float]:
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    ce = F.nll_loss(logp.reshape(-1, logp.shape[-1]), ids[:, 1:].reshape(-1))
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1).mean()
    return float(ce), float(kl)


def clean_pass(run, heldout: list[int], cfg, device, dtype: torch.dtype):
    """(model, held-out context ids, clean log-probs, clean CE) that the spliced passes are compared with; None
    when the held-out shards hold no whole context."""
    from activations.model import load_model

    model = load_model(run.manifest.model["id"], device, dtype).model
    ids = _contexts(run, heldout, cfg.ce_contexts).to(device)
    if ids.numel() == 0:
        return None
    clean = model(ids).logits
    clean_logp = F.log_softmax(clean[:, :-1].float(), -1)
    return model, ids, clean_logp, _ce_kl(clean, ids, clean_logp)[0]


@torch.no_grad()
def downstream_metrics(run, saes: dict, heldout: list[int], cfg, device,
                       dtype: torch.dtype = torch.float32) -> dict:
    from activations.hooks import capture, splice

    clean = clean_pass(run, heldout, cfg, device, dtype)
    if clean is None:
        return {}
    model, ids, clean_logp, ce_clean = clean
    first = max(0, cfg.exclude_first)

    def keep_first(a, new):
        """Positions the SAEs were not trained on (exclude_first) keep their clean activation, in both the
        SAE and the zero-ablation pass, so loss recovered compares like with like."""
        if first:
            new = new.clone()
            new[:, :first] = a[:, :first]
        return new

    out = {}
    for sid, sae in saes.items():
        c = sae.cfg
        cross = None
        if c.mode in ("crosscoder", "clt"):  # one key replaced at a time, from the clean inputs of every layer
            acts = capture(model, c.in_keys, ids)
            flat = torch.cat([acts[k].reshape(-1, acts[k].shape[-1]) for k in c.in_keys], 1)
            cross = dict(zip(c.out_keys, sae.reconstruct(flat.float()).chunk(len(c.out_keys), 1)))
        per_key = {}
        for key in c.out_keys:
            stash: dict = {}

            def replace(a, key=key, c=c, sae=sae, cross=cross, stash=stash):
                if cross is not None:
                    new = cross[key].reshape(a.shape).to(a.dtype)
                else:
                    src = stash["x"] if c.mode == "transcoder" else a
                    kw = {"key": key} if c.mode == "multilayer" else {}
                    new = sae.reconstruct(src.reshape(-1, src.shape[-1]).float(), **kw).reshape(a.shape).to(a.dtype)
                return keep_first(a, new)

            with contextlib.ExitStack() as stack:
                if c.mode == "transcoder":
                    stack.enter_context(splice(model, c.in_keys[0], lambda a, stash=stash: stash.__setitem__("x", a) or a))
                stack.enter_context(splice(model, key, replace))
                ce_sae, kl_sae = _ce_kl(model(ids).logits, ids, clean_logp)
            with splice(model, key, lambda a: keep_first(a, torch.zeros_like(a))):
                ce_zero, kl_zero = _ce_kl(model(ids).logits, ids, clean_logp)
            denom = ce_zero - ce_clean
            per_key[key] = {"ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero, "kl_sae": kl_sae,
                            "kl_zero": kl_zero,
                            "ce_loss_recovered": (ce_zero - ce_sae) / denom if abs(denom) > 1e-9 else float("nan"),
                            "kl_recovered": (kl_zero - kl_sae) / kl_zero if kl_zero > 1e-12 else float("nan")}
        out[sid] = per_key
    return out


def _keep_first(first: int):
    def keep(a, new):
        """Positions the SAEs were not trained on (exclude_first) keep the forward's own activation."""
        if first:
            new = new.clone()
            new[:, :first] = a[:, :first]
        return new
    return keep


@torch.no_grad()
def replaced_forward(model, ids: torch.Tensor, system, layers: list[int], keep) -> torch.Tensor:
    """Logits with the MLP output of every layer in `layers` replaced at once by `system` (a CLT or a
    TranscoderSet: encode_layer / decode_to, raw units); system=None zeroes those MLP outputs instead."""
    from activations.hooks import splice

    acts, inputs = {}, {}

    def read(a, layer):
        x = a.reshape(-1, a.shape[-1]).float()
        inputs[layer] = x
        acts[layer] = system.encode_layer(layer, x)
        return a

    def write(a, layer):
        if system is None:
            return keep(a, torch.zeros_like(a))
        new = system.decode_to(layer, acts)
        skip = system.skip(layer) if hasattr(system, "skip") else None  # a transcoder's optional linear skip term
        if skip is not None:
            new = new + skip(inputs[layer])
        return keep(a, new.reshape(a.shape).to(a.dtype))

    with contextlib.ExitStack() as stack:
        for layer in layers:
            if system is not None:
                stack.enter_context(splice(model, f"mlp_in.{layer}", lambda a, layer=layer: read(a, layer)))
            stack.enter_context(splice(model, f"mlp_out.{layer}", lambda a, layer=layer: write(a, layer)))
        return model(ids).logits


def replacement_systems(saes: dict) -> dict:
    """{sae_id: system} for the every-MLP-at-once eval: each CLT, and the run's transcoders as one set (its result
    is reported on each of them)."""
    from sae.circuits.adapter import TranscoderSet

    systems = {sid: sae for sid, sae in saes.items() if sae.cfg.mode == "clt"}
    trans = {sid: sae for sid, sae in saes.items() if sae.cfg.mode == "transcoder"}
    if trans:
        try:
            bank = TranscoderSet(trans)
        except StrataError:  # not one mlp_in.L -> mlp_out.L transcoder per layer: no every-MLP-at-once figure
            return systems
        systems.update({sid: bank for sid in trans})
    return systems


@torch.no_grad()
def all_mlps_metrics(run, saes: dict, heldout: list[int], cfg, device, dtype: torch.dtype = torch.float32) -> dict:
    systems = replacement_systems(saes)
    if not systems:
        return {}
    clean = clean_pass(run, heldout, cfg, device, dtype)
    if clean is None:
        return {}
    model, ids, clean_logp, ce_clean = clean
    keep = _keep_first(max(0, cfg.exclude_first))
    done: dict = {}
    out = {}
    for sid, system in systems.items():
        if id(system) not in done:
            layers = system.cfg.layers if hasattr(system, "cfg") else system.layers
            ce_rep, kl_rep = _ce_kl(replaced_forward(model, ids, system, layers, keep), ids, clean_logp)
            ce_zero, kl_zero = _ce_kl(replaced_forward(model, ids, None, layers, keep), ids, clean_logp)
            denom = ce_zero - ce_clean
            done[id(system)] = {
                "layers": layers, "ce_clean": ce_clean, "ce_replaced": ce_rep, "ce_zero": ce_zero, "kl_replaced": kl_rep,
                "kl_zero": kl_zero, "ce_loss_recovered": (ce_zero - ce_rep) / denom if abs(denom) > 1e-9 else float("nan"),
                "kl_recovered": (kl_zero - kl_rep) / kl_zero if kl_zero > 1e-12 else float("nan")}
        out[sid] = done[id(system)]
    return out
