"""`strata train` under `torchrun --nproc-per-node N` (torch.distributed: gloo on CPU, nccl on CUDA).

--parallel data (the default when WORLD_SIZE > 1): every process builds the same global batch stream (the reader
    is deterministic in its seed) and steps on rows rank::N of each batch. The result equals a single process with
    the same --batch-size: each process's loss is N * (its slice's squared error) / (the *global* batch variance),
    so the averaged gradient is the single-process gradient; gradients are all-reduced before clipping; latent
    firing counts (dead latents, AuxK) are all-reduced; the init is computed on rank 0 and broadcast. TopK and
    ReLU only: BatchTopK/Matryoshka select over the whole batch and JumpReLU's L0 penalty is non-linear in it.
--parallel layers: each process owns every N-th SAE of a per-layer bank (round-robin over the ids in training
    order), reads only its keys and steps only its SAEs; each SAE's trajectory is the single-process one.
Rank 0 alone writes config.json and metrics.jsonl; the checkpoint has the single-process layout (layers: every
rank writes its SAE folders and optimizer part into checkpoint.partial, rank 0 merges and swaps it in).
A failure raised on one rank makes torchrun stop the others (no rank waits forever).
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from activations import layout
from activations.atomic import atomic_write_json, replace_dir
from activations.errors import StrataError
from activations.ownership import mark

DATA_ARCHS = ("topk", "relu")


class Parallel:
    """This process's place in a torchrun job; size 1 (no torchrun) makes every method a no-op."""

    def __init__(self, mode: str, device: str = "auto"):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.mode = "single" if self.size == 1 else ("data" if mode in ("auto", "data") else mode)
        self.all_ids: list[str] = []
        if self.size > 1:
            import torch.distributed as dist

            cuda = torch.cuda.is_available() and device != "cpu"
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
            self.dist = dist

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            self.dist.barrier()

    def close(self) -> None:
        """Leave the process group once every rank is done (gloo's threads can abort a process that exits
        with the group still open: "terminate called without an active exception")."""
        if self.size > 1 and self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()

    def check(self, cfg, n_saes: int) -> None:
        if cfg.parallel not in ("auto", "data", "layers"):
            raise StrataError(f"--parallel {cfg.parallel!r}: use auto, data or layers")
        if self.mode == "data":
            if cfg.arch not in DATA_ARCHS:
                raise StrataError(f"--parallel data supports {', '.join(DATA_ARCHS)} (--arch {cfg.arch} selects over the "
                                  f"whole batch); use --parallel layers or a single process")
            if cfg.batch_size % self.size:
                raise StrataError(f"--batch-size {cfg.batch_size} is not divisible by the {self.size} processes; "
                                  f"pick a multiple of {self.size}")
        if self.mode == "layers" and n_saes < self.size:
            raise StrataError(f"--parallel layers needs at least one SAE per process ({n_saes} SAEs, {self.size} processes); "
                              f"train more layers, use fewer processes or --parallel data")

    # ------------------------------------------------------------------ setup
    def setup_saes(self, saes: dict) -> dict:
        """data: rank 0's SAEs everywhere (init done once); layers: keep this rank's share of the bank."""
        self.all_ids = list(saes)
        if self.mode == "data":
            for sae in saes.values():
                for t in sae.state_dict().values():
                    self.dist.broadcast(t, 0)
        if self.mode == "layers":
            return {sid: s for i, (sid, s) in enumerate(saes.items()) if i % self.size == self.rank}
        return saes

    @property
    def sync(self):
        """What SAEStepper(sync=...) takes: this process group in data-parallel training (gradients averaged over
        processes before clipping, firing counts summed, FVU over the global batch), else None."""
        return self if self.mode == "data" else None

    # in-place all-reduces for SAEStepper's sync
    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        return _all_reduce(t, self).div_(self.size)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return _all_reduce(t, self)

    def global_variance(self, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The FVU denominator of the global batch (this process holds a slice y of it), and the process count
        (sae.base.FVU)."""
        s = torch.cat([y.double().sum(0), torch.tensor([float(y.shape[0])], dtype=torch.float64, device=y.device)])
        _all_reduce(s, self)
        mean = (s[:-1] / s[-1]).to(y.dtype)
        var = _all_reduce(F.mse_loss(y, mean.expand_as(y), reduction="sum").double(), self).to(y.dtype)
        return var, self.size

    def local_batch(self, acts: dict) -> dict:
        if self.mode != "data":
            return acts
        return {k: v[self.rank::self.size] for k, v in acts.items()}

    def gather_record(self, record: dict) -> dict:
        """layers: every rank's per-SAE metrics on rank 0 (in training order)."""
        if self.mode != "layers":
            return record
        parts = [None] * self.size
        self.dist.all_gather_object(parts, record)
        merged = {k: v for p in parts for k, v in p.items()}
        return {sid: merged[sid] for sid in self.all_ids if sid in merged}

    # ------------------------------------------------------------------ checkpoints
    def write_checkpoint(self, write_checkpoint, run, name: str, saes: dict, optimizers: dict, state: dict) -> None:
        if self.mode == "single":
            return write_checkpoint(run, name, saes, optimizers, state)
        if self.mode == "data":
            if self.writes:
                write_checkpoint(run, name, saes, optimizers, state)
            self.barrier()
            return
        self._write_layers(write_checkpoint, run, name, saes, optimizers, state)

    def _write_layers(self, write_checkpoint, run, name, saes, optimizers, state) -> None:
        """Every rank writes its SAE folders and optimizer part into checkpoint.partial; rank 0 merges the parts
        into the single-process files and swaps the folder in (replace_dir), so the old or the new one exists."""
        from sae.checkpoint import _rng_to_json, optimizer_tensors, save_sae

        final = layout.checkpoint_dir(run, name)
        tmp = final.with_name(final.name + ".partial")
        if self.writes:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "saes").mkdir(parents=True)
            mark(tmp, "checkpoint")
        self.barrier()
        opt_tensors, groups = {}, {}
        for sid, sae in saes.items():
            save_sae(sae, tmp / "saes" / sid)
            groups[sid] = optimizer_tensors(sid, sae, optimizers[sid], opt_tensors)
        save_file(opt_tensors, str(tmp / f"optimizer.rank-{self.rank:05d}.safetensors"))
        atomic_write_json(tmp / f"param_groups.rank-{self.rank:05d}.json", groups)
        self.barrier()
        if self.writes:
            opt, groups = {}, {}
            for r in range(self.size):
                part, pg = tmp / f"optimizer.rank-{r:05d}.safetensors", tmp / f"param_groups.rank-{r:05d}.json"
                opt.update(load_file(str(part)))
                groups.update(json.loads(pg.read_text()))
                part.unlink()
                pg.unlink()
            save_file(opt, str(tmp / "optimizer.safetensors"))
            atomic_write_json(tmp / "state.json", dict(state, sae_ids=list(self.all_ids),
                                                       optimizer_param_groups={s: groups[s] for s in self.all_ids},
                                                       rng=_rng_to_json(torch.get_rng_state())))
            replace_dir(tmp, final, "checkpoint")
        self.barrier()


# ---------------------------------------------------------------- data parallel
def _all_reduce(t: torch.Tensor, par: Parallel) -> torch.Tensor:
    """In place on t (a contiguous copy when t is a strided view)."""
    c = t if t.is_contiguous() else t.contiguous()
    par.dist.all_reduce(c)
    if c is not t:
        t.copy_(c)
    return t


class NullLogger:
    """Ranks other than 0 log nothing (rank 0 writes metrics.jsonl)."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
