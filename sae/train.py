"""`strata train`: read a harvest run's training shards once per epoch and step every SAE of the chosen mode
on each batch (see modes.py), logging metrics and writing atomic checkpoints; `--resume` continues exactly
(same weights, optimizer moments, RNG, data position) so a killed-and-resumed run ends with the same weights
as an uninterrupted one."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from activations import layout
from activations.atomic import existing_dir, finish_replace
from activations.config import identity_differences
from activations.errors import StrataError
from activations.lock import run_lock
from activations.model import resolve_device
from activations.precision import Precision, resolve
from activations.reader import ActivationReader, open_run
from sae import cpu_select, train_folder
from sae.checkpoint import (
    load_sae,
    read_checkpoint,
    restore_optimizers,
    restore_rng,
    write_checkpoint,
)
from sae.config import ARCHS
from sae.distributed import NullLogger, Parallel
from sae.logger import MetricsLogger
from sae.metrics import LatentStats, ReconStats
from sae.models import build_sae
from sae.modes import Unit, check_exclude_first, norm_scale, sae_configs, select_keys, split_seed
from sae.optim import NonFiniteLoss, SAEStepper, default_lr, latents_per_dictionary
from sae.train_config import TrainConfig


def check_config(cfg: TrainConfig) -> None:
    layout.check_name(cfg.resolved_name())
    if cfg.arch not in ARCHS:
        raise StrataError(f"unknown architecture {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise StrataError(f"learning rate {cfg.lr} must be positive; pass --lr > 0 or leave it out for the width-scaled default")
    if cfg.batch_size <= 0 or cfg.epochs <= 0:
        raise StrataError("--batch-size and --epochs must be positive")
    if not 0 <= cfg.heldout_fraction < 1:
        raise StrataError(f"--heldout-fraction {cfg.heldout_fraction} must be in [0, 1)")
    if cfg.b_dec_init not in ("median", "mean", "zero"):
        raise StrataError(f"--b-dec-init {cfg.b_dec_init!r}: use median, mean or zero")


def sample_rows(run, shards: list[int], n: int, seed: int) -> np.ndarray:
    """n global token rows drawn uniformly from the given shards (sorted, for h5py)."""
    recs = {s.index: s for s in run.manifest.shards}
    ranges = [(recs[i].token_start, recs[i].rows) for i in shards]
    total = sum(r for _, r in ranges)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = np.cumsum([0] + [r for _, r in ranges])
    out = np.empty_like(picks)
    for (tok0, _), a, b in zip(ranges, starts[:-1], starts[1:]):
        m = (picks >= a) & (picks < b)
        out[m] = tok0 + picks[m] - a
    return np.sort(out).astype(np.int64)


def fresh_saes(cfg: TrainConfig, run, configs: dict, train_shards: list[int], device) -> dict:
    """Build each SAE: normalisation scalars and decoder bias from a sample of training tokens."""
    keys = sorted({k for c in configs.values() for k in c.in_keys + c.out_keys})
    rows = sample_rows(run, train_shards, cfg.norm_sample_tokens, cfg.seed)
    rows = rows[rows % run.manifest.context_length >= cfg.exclude_first]  # as the reader will (exclude_first)
    sample = {k: torch.from_numpy(np.asarray(run.read_rows(k, rows), dtype=np.float32)).to(device) for k in keys}
    scales = {k: norm_scale(v, k) for k, v in sample.items()}
    saes = {}
    gens = {}  # one generator per init seed (--seeds), each drawn in the same id order: seed s inits as --seed s
    for sae_id, c in configs.items():
        c.in_scales = [scales[k] for k in c.in_keys]
        c.out_scales = [scales[k] for k in c.out_keys]
        sae = build_sae(c)
        seed = split_seed(sae_id)[1] if cfg.seeds is not None else None
        seed = cfg.seed if seed is None else seed
        if seed not in gens:
            gens[seed] = torch.Generator().manual_seed(seed)
        sae.reset_parameters(gens[seed])
        sae.to(device)
        x, y = Unit(sae_id, sae).io(sample)
        if cfg.b_dec_init != "zero":
            sae.init_from_sample(x, y, cfg.b_dec_init)
        saes[sae_id] = sae
    return saes


def train(cfg: TrainConfig) -> Path:
    """Everything that can be checked is checked before the run is locked and train/<name> is touched; the
    whole training holds the run shared and "train-<name>" exclusively (rank 0 for a torchrun job)."""
    check_config(cfg)
    name = cfg.resolved_name()
    par = Parallel(cfg.parallel, cfg.device)  # torchrun: this process's share (sae/distributed.py)
    run = open_run(cfg.run_dir)
    check_exclude_first(cfg.exclude_first, run.manifest.context_length)
    keys = select_keys(cfg, run.keys, run.manifest.n_layers)
    configs = sae_configs(cfg, keys, {k: run.d(k) for k in keys}, run.manifest.model, run.manifest.context_length)
    par.check(cfg, len(configs))
    train_shards, _ = run.split(cfg.heldout_fraction)
    if not train_shards:
        raise StrataError(f"no training shards left after holding out {cfg.heldout_fraction:.0%}; lower --heldout-fraction")
    prec = train_precision(cfg, configs, par)
    if par.writes:
        print(prec.line())
        if cfg.arch in ("topk", "batchtopk", "matryoshka") and resolve_device(cfg.device).type == "cpu" and not cpu_select.available():
            print(f"top-k selection: {cpu_select.status()}; a C++ compiler (g++ or clang++) makes it ~2x cheaper")
    lock = run_lock(cfg.run_dir, f"strata train --name {name}", scope=f"train-{name}") if par.writes else contextlib.nullcontext()
    with lock:
        tdir = layout.train_dir(cfg.run_dir, name)
        ckpt, made = _open_folder(cfg, par, tdir, prec)
        try:
            _fit(cfg, par, run, name, configs, train_shards, ckpt, prec)
        except Exception:
            if made and existing_dir(layout.checkpoint_dir(cfg.run_dir, name)) is None:
                train_folder.remove_created(made)  # failed before any checkpoint: leave nothing behind
            raise
    par.close()
    return tdir


def sparsity_warmup(cfg: TrainConfig, sae_cfg, total_steps: int) -> int:
    """Steps over which the sparsity penalty ramps up: ReLU's L1 warm-up (default 5% of the steps); the CLT tanh
    penalty's ramp (default the whole run, as in Anthropic's recipe); none for the other architectures."""
    if sae_cfg.arch == "relu":
        return cfg.l1_warmup_steps or max(1, total_steps // 20)
    if sae_cfg.mode == "clt" and sae_cfg.arch == "jumprelu" and sae_cfg.sparsity == "tanh":
        return cfg.tanh_warmup_steps or total_steps
    return 0


def train_precision(cfg: TrainConfig, configs: dict, par: Parallel) -> Precision:
    """The encoder matmul's dtype: --precision (auto probes the [batch, d_in] x [d_in, n_latents] shapes)."""
    if cfg.bf16 and cfg.precision == "fp32":
        raise StrataError("--bf16 and --precision fp32 contradict each other; drop --bf16 (it means --precision bf16)")
    requested = "bf16" if cfg.bf16 else cfg.precision
    shapes = {(cfg.batch_size, c.d_in, c.n_latents) for c in configs.values()}
    device = resolve_device(cfg.device)
    prec = resolve(requested, device, shapes)
    if par.size > 1:  # under torchrun every process computes alike: bf16 only where each one found it faster
        votes = par.sum_(torch.tensor([float(prec.name == "bf16")], device=device))
        if prec.name == "bf16" and int(votes.item()) < par.size:
            prec = Precision("fp32", "not every process found bf16 faster")
    return prec


def _open_folder(cfg: TrainConfig, par: Parallel, tdir: Path, prec: Precision):
    """Check train/<name> for this --resume / --overwrite / fresh start, then (rank 0) replace or create it.
    Returns (checkpoint to resume or None, folders created for train_folder.remove_created)."""
    ckpt = None
    if cfg.resume:
        saved = train_folder.read_config(tdir)
        if saved is None:
            if not tdir.is_dir():
                raise StrataError(f"nothing to resume in {tdir}; drop --resume to start training")
            train_folder.check_replaceable(tdir)  # killed before its config.json was written: starts afresh
        else:
            diffs = identity_differences(saved["identity"], cfg.identity(), TrainConfig().identity())
            if diffs:
                raise StrataError("the config differs from the run being resumed (" + "; ".join(diffs) + "); "
                                  "resume with the original flags or train under a new --name")
            ckpt = read_checkpoint(cfg.run_dir, cfg.resolved_name())
            before = saved.get("precision", {}).get("precision", "fp32")
            if before != prec.name and par.writes:
                print(f"note: {tdir.name} was trained in {before} so far; it continues in {prec.name} "
                      f"(weights and Adam state are fp32 either way)")
    elif tdir.exists() or tdir.is_symlink():
        if not cfg.overwrite:
            raise StrataError(f"{tdir} exists; pass --resume to continue it, --overwrite to replace it, or a new --name")
        train_folder.check_replaceable(tdir)
    par.barrier()  # every rank has checked the folder before rank 0 changes it
    made = []
    if par.writes:
        if not cfg.resume and tdir.exists():
            train_folder.remove(tdir)
        if cfg.resume and ckpt is not None:
            finish_replace(layout.checkpoint_dir(cfg.run_dir, cfg.resolved_name()), "checkpoint")  # a kill mid-swap left .old
        if train_folder.read_config(tdir) is None:
            invocation = ("resume", "overwrite")  # how this process was started, not what the run is
            record = {"identity": cfg.identity(), "config": {k: v for k, v in vars(cfg).items() if k not in invocation},
                      "precision": prec.record()}
            made = train_folder.create(tdir, record)
    par.barrier()
    return ckpt, made


def _fit(cfg: TrainConfig, par: Parallel, run, name: str, configs: dict, train_shards: list[int], ckpt,
         prec: Precision) -> None:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        state, folder = ckpt
        missing = [sid for sid in configs if sid not in state["sae_ids"]]
        if missing:
            raise StrataError(f"the checkpoint in {folder} has no SAE {missing[0]}; resume with the original flags or "
                              f"retrain with --overwrite")
        saes = {sid: load_sae(folder / "saes" / sid, device, trainable=True).train() for sid in state["sae_ids"]}
        for sid, sae in saes.items():
            if sae.cfg.d_in != configs[sid].d_in:
                raise StrataError(f"checkpoint SAE {sid} has d_in {sae.cfg.d_in} but the shards give {configs[sid].d_in}")
        step, tokens = int(state["step"]), int(state["tokens"])
    else:
        saes = fresh_saes(cfg, run, configs, train_shards, device)
        step, tokens = 0, 0

    saes = par.setup_saes(saes)
    reader = ActivationReader(run, sorted({k for s in saes.values() for k in s.cfg.in_keys + s.cfg.out_keys}),
                              cfg.batch_size, shards=train_shards, shuffle=True, seed=cfg.seed, epochs=cfg.epochs,
                              drop_last=True, start_batch=step, exclude_first=cfg.exclude_first)
    total_steps = len(reader)
    if cfg.max_tokens:
        total_steps = min(total_steps, cfg.max_tokens // cfg.batch_size)
    if total_steps <= 0:
        raise StrataError(f"the training shards hold fewer tokens than one batch of {cfg.batch_size}; lower --batch-size")
    warmup = cfg.warmup_steps or min(1000, max(1, total_steps // 100))
    units = [Unit(sid, sae) for sid, sae in saes.items()]
    steppers = {}
    for u in units:
        u.sae.set_compute_dtype(prec.dtype)
        steppers[u.sae_id] = SAEStepper(u.sae, cfg.lr or default_lr(latents_per_dictionary(u.sae.cfg)), total_steps, warmup,
                                        cfg.decay_fraction, cfg.grad_clip, eps=cfg.adam_eps, sync=par.sync,
                                        sparsity_warmup_steps=sparsity_warmup(cfg, u.sae.cfg, total_steps))
    if ckpt is not None:
        restore_optimizers(ckpt[1], ckpt[0], saes, {sid: st.opt for sid, st in steppers.items()})
        restore_rng(ckpt[0])

    tdir = layout.train_dir(cfg.run_dir, name)
    logger = NullLogger() if not par.writes else MetricsLogger(
        layout.metrics_path(cfg.run_dir, name), step if cfg.resume else None, cfg.wandb_project, cfg.wandb_mode, name,
        cfg.identity())
    last_good = step if ckpt is not None else None

    def checkpoint(done: bool):
        for sid, sae in saes.items():  # a finite loss can still come with an update that overflowed
            if not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
                kept = f"kept the last good checkpoint (step {last_good})" if last_good is not None else "no checkpoint was written"
                raise StrataError(f"the weights of SAE {sid} became NaN/inf at step {step}; stopped, {kept}; lower --lr")
        for sae in saes.values():
            sae.cfg.tokens_seen = tokens * (len(sae.cfg.in_keys) if sae.cfg.mode == "multilayer" else 1)
        try:
            par.write_checkpoint(write_checkpoint, cfg.run_dir, name, saes, {sid: st.opt for sid, st in steppers.items()},
                                 {"step": step, "tokens": tokens, "total_steps": total_steps, "batches_read": step,
                                  "done": done, "name": name})
        except OSError as e:
            kept = f"the last complete checkpoint (step {last_good}) is kept" if last_good is not None else "no checkpoint was written"
            raise StrataError(f"cannot write the checkpoint into {tdir} ({e.strerror or e}); {kept}; free disk space or "
                              f"make it writable, then rerun with --resume") from None

    windows = {u.sae_id: LatentStats(u.sae.cfg.n_latents) for u in units}
    sums = {u.sae_id: {} for u in units}
    t0, t_tokens = time.perf_counter(), tokens
    bar = None
    if cfg.progress and par.writes:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc=f"train {name}", unit="step")
    try:
        if step >= total_steps:
            if not (ckpt and ckpt[0].get("done")):
                checkpoint(True)
            return
        for batch in reader:
            if step >= total_steps:
                break
            acts = {k: v.to(device, non_blocking=True) for k, v in par.local_batch(batch.acts).items()}
            log_now = (step + 1) % cfg.log_every == 0 or step + 1 == total_steps
            record = {}
            for u in units:
                x, y = u.io(acts)
                try:
                    out = steppers[u.sae_id].step(x, y, step, u.loss_fn)
                except NonFiniteLoss as e:
                    kept = f"kept the last good checkpoint (step {last_good})" if last_good is not None else "no checkpoint was written"
                    raise StrataError(f"{e} for SAE {u.sae_id}; stopped, {kept}; lower --lr or check the shards (strata verify)") from None
                windows[u.sae_id].update(out.fired, float(out.l0), x.shape[0])
                for k, v in dict(out.parts, loss=out.loss.detach()).items():
                    sums[u.sae_id][k] = sums[u.sae_id].get(k, 0.0) + float(v)
                if log_now:
                    record[u.sae_id] = _unit_metrics(u, y, out, windows[u.sae_id], sums[u.sae_id])
            step += 1
            tokens += batch.rows.numel()
            if bar is not None:
                bar.update(1)
            if log_now:
                dt = time.perf_counter() - t0
                logger.log({"step": step, "tokens": tokens,
                            "lr": steppers[units[0].sae_id].opt.param_groups[0]["lr"],
                            "tokens_per_s": (tokens - t_tokens) / max(dt, 1e-9), "saes": par.gather_record(record)})
                t0, t_tokens = time.perf_counter(), tokens
                windows = {u.sae_id: LatentStats(u.sae.cfg.n_latents) for u in units}
                sums = {u.sae_id: {} for u in units}
            if step % cfg.checkpoint_every == 0 and step < total_steps:
                checkpoint(False)
                last_good = step
        checkpoint(True)
    finally:
        if bar is not None:
            bar.close()
        logger.close()


@torch.no_grad()
def _unit_metrics(u: Unit, y: torch.Tensor, out, window: LatentStats, sums: dict) -> dict:
    n_steps = max(1, window.n // max(1, y.shape[0]))
    m = {k: v / n_steps for k, v in sums.items()}
    m.update(window.summary())
    dead = u.sae.dead_mask()
    m["frac_dead"] = float(dead.double().mean())   # by tokens since last firing (cfg.dead_tokens)
    m["frac_dead_window"] = window.summary()["frac_dead"]
    parts = u.parts(y, out.recon)
    rs = ReconStats()
    rs.update(y, out.recon)
    m.update({k: v for k, v in rs.summary().items() if k in ("fvu", "explained_variance", "mse", "cosine", "shrinkage")})
    if len(parts) > 1:
        for key, (yk, rk) in parts.items():
            r = ReconStats()
            r.update(yk, rk)
            s = r.summary()
            m[f"fvu/{key}"], m[f"shrinkage/{key}"] = s["fvu"], s["shrinkage"]
    return m
