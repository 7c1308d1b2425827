"""`strata harvest`: text -> tokens -> one forward pass per batch with hooks -> per-layer HDF5 shards.

Three threads keep memory bounded whatever the corpus size: a packer turns documents into token batches,
the main thread runs the model (stopping after the deepest requested block), and a writer streams rows into
the current shard's files. Bounded queues sit between them, so writing overlaps the next forward.

Crash safety: shard files are written under temporary names and renamed when complete; the manifest is then
replaced atomically with the new shard's record (checksums, and the corpus position after it). `--resume`
drops anything not in the manifest and continues from the last complete shard, so a killed run loses at most
the shard in flight, and its files end up byte-identical to an uninterrupted run's.

Under `torchrun --nproc-per-node N` shard g belongs to rank g % N. Every rank reads the same token stream
(tokenizing is cheap next to the forward pass) but runs the model only on its own shards, and keeps its own
manifest in parts/; rank 0 merges them into manifest.json at the end. Shard boundaries and forward batches are
the same as in a single-process run, so the files are too.
"""
from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from activations import layout
from activations.atomic import atomic_path
from activations.config import HarvestConfig
from activations.corpus import describe, documents
from activations.errors import StrataError
from activations.hooks import capture, key_depth, parse_keys
from activations.manifest import (Manifest, ShardRecord, add_norm_stats, file_sha256, load_manifest, merge_manifests,
                                  relpath, save_manifest, software_versions)
from activations.model import load_model
from activations.shards import ActivationShardWriter, to_storage, write_tokens
from activations.tokens import CorpusPosition, pack_contexts, wants_bos

_RUN_ITEMS = ("manifest.json", "parts", "tokens", "acts", "train", "index", "share")


# ---------------------------------------------------------------- processes (single, or torchrun ranks)
class World:
    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
            self.dist = dist

    def owns(self, shard: int) -> bool:
        return shard % self.size == self.rank

    def barrier(self) -> None:
        if self.size > 1:
            self.dist.barrier()

    def from_rank0(self, value):
        if self.size == 1:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def manifest_path(self, run: Path) -> Path:
        return layout.manifest_path(run) if self.size == 1 else layout.part_manifest_path(run, self.rank)


# ---------------------------------------------------------------- the run directory before we start
def _check_config(cfg: HarvestConfig) -> None:
    if cfg.context < 2:
        raise StrataError(f"--context {cfg.context} is too short; use at least 2 tokens (128 is typical)")
    if cfg.batch_contexts < 1 or cfg.shard_tokens < 1 or cfg.queue_batches < 1:
        raise StrataError("--batch-contexts, --shard-tokens and --queue-batches must be positive integers")
    if cfg.max_tokens < 0:
        raise StrataError(f"--max-tokens {cfg.max_tokens} is negative; use 0 for the whole corpus or a positive budget")
    if 0 < cfg.max_tokens < cfg.context:
        raise StrataError(f"--max-tokens {cfg.max_tokens} is less than one context ({cfg.context}); raise it or lower --context")
    if cfg.dtype not in ("float16", "bfloat16"):
        raise StrataError(f"--dtype {cfg.dtype} is not supported for storage; use float16 or bfloat16")
    if cfg.resume and cfg.overwrite:
        raise StrataError("--resume and --overwrite contradict each other; pick one")


def _remove_run_items(run: Path) -> None:
    for item in _RUN_ITEMS:
        p = run / item
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _prepare_run_dir(cfg: HarvestConfig, world: World) -> None:
    """Rank 0 only: refuse to mix runs, apply --overwrite, clear leftovers of a run that never finished a shard."""
    run = Path(cfg.run_dir)
    if run.exists() and not run.is_dir():
        raise StrataError(f"{run} is a file, not a directory; choose another run directory")
    if cfg.overwrite and run.exists():
        _remove_run_items(run)
    has_manifest = layout.manifest_path(run).is_file()
    has_parts = (run / "parts").is_dir() and any((run / "parts").iterdir())
    if not has_manifest and not has_parts and run.is_dir() and {p.name for p in run.iterdir()} <= set(_RUN_ITEMS):
        _remove_run_items(run)  # leftovers of a run killed before its first shard: nothing finished to keep
    if has_parts and world.size == 1 or has_manifest and world.size > 1 and not load_manifest(run).complete:
        raise StrataError(f"{run} was started with a different number of processes; resume it the way it was started")
    if has_manifest or has_parts:
        old = load_manifest(run, layout.manifest_path(run) if has_manifest else next((run / "parts").iterdir()))
        if not cfg.resume:
            same = old.config == cfg.identity()
            raise StrataError(f"{run} already holds {'this' if same else 'a different'} run ({old.n_tokens} tokens of "
                              f"{old.model['id']}); pass --resume to continue it or --overwrite to replace it")
        diffs = [f"{k}: {old.config.get(k)!r} -> {v!r}" for k, v in cfg.identity().items() if old.config.get(k) != v]
        if diffs:
            raise StrataError(f"cannot resume {run} with a different config ({'; '.join(diffs)}); use the original flags or --overwrite")
    elif cfg.resume and run.exists() and any(run.iterdir()):
        raise StrataError(f"{run} holds no manifest to resume from; remove the folder or pass --overwrite")
    elif run.exists() and any(run.iterdir()):
        raise StrataError(f"{run} is not empty and holds no Strata run; choose an empty folder or pass --overwrite")


def _drop_unlisted(run: Path, manifest: Manifest, world: World) -> None:
    """Remove this process's partial files and shards written after its manifest's last update."""
    listed = {run / f["path"] for s in manifest.shards for f in s.files.values()}
    for folder in [layout.tokens_dir(run)] + [layout.acts_dir(run, k) for k in manifest.keys]:
        if folder.is_dir():
            for p in folder.iterdir():
                i = layout.shard_index(p)
                if p not in listed and (i is None or world.owns(i)):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()


# ---------------------------------------------------------------- the writer thread
class _ShardWriterThread(threading.Thread):
    """Consumes ("rows", shard, contexts, {key: rows}, stats), ("commit", shard, ...) and ("stop", ...) messages."""

    def __init__(self, run: Path, manifest: Manifest, manifest_path: Path, shard_rows: int, dtype: str, inbox_size: int):
        super().__init__(daemon=True)
        self.run_dir, self.manifest, self.manifest_path = run, manifest, manifest_path
        self.shard_rows, self.dtype = shard_rows, dtype
        self.inbox: queue.Queue = queue.Queue(maxsize=inbox_size)
        self.error: BaseException | None = None
        self._open: dict = {}
        self._ctx: dict = {}

    def _start_shard(self, i: int):
        self.tokens: list = []
        self.stats = {k: np.zeros(3) for k in self.manifest.keys}  # sum norm, sum sq norm, max norm
        for key in self.manifest.keys:
            ctx = atomic_path(layout.acts_shard_path(self.run_dir, key, i))
            self._ctx[key] = ctx
            self._open[key] = ActivationShardWriter(ctx.__enter__(), self.manifest.dims[key], self.dtype, self.shard_rows)

    def _commit(self, i: int):
        m = self.manifest
        rows = sum(len(c.token_ids) for c in self.tokens)
        tok_path = layout.tokens_shard_path(self.run_dir, i)
        with atomic_path(tok_path) as tmp:
            write_tokens(tmp, *(np.concatenate([getattr(c, f) for c in self.tokens]) for f in ("token_ids", "doc_ids", "positions")))
        files = {"tokens": {"path": relpath(self.run_dir, tok_path), "sha256": file_sha256(tok_path)}}
        for key in m.keys:
            self._open.pop(key).close()
            self._ctx.pop(key).__exit__(None, None, None)
            path = layout.acts_shard_path(self.run_dir, key, i)
            files[key] = {"path": relpath(self.run_dir, path), "sha256": file_sha256(path)}
        for key, (s, sq, mx) in self.stats.items():
            add_norm_stats(m.norm_stats, key, rows, s, sq, mx)
        end = self.tokens[-1].end
        m.shards.append(ShardRecord(index=i, rows=rows, token_start=i * self.shard_rows, files=files,
                                    resume={"doc": end.doc, "offset": end.offset}))
        m.n_tokens += rows
        save_manifest(self.run_dir, m, self.manifest_path)

    def abort(self):
        for key in list(self._open):
            try:
                self._open.pop(key).close()
            except Exception:
                pass
            try:
                self._ctx.pop(key).__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass

    def run(self):  # thread body
        try:
            while True:
                kind, shard, contexts, rows, stats = self.inbox.get()
                if kind == "stop":
                    return
                if kind == "commit":
                    self._commit(shard)
                    continue
                if not self._open:
                    self._start_shard(shard)
                self.tokens.extend(contexts)
                for key, block in rows.items():
                    self._open[key].append(block)
                for key, (s, sq, mx) in stats.items():
                    acc = self.stats[key]
                    acc[0] += s
                    acc[1] += sq
                    acc[2] = max(acc[2], mx)
        except BaseException as e:  # handed to the main thread
            self.error = e
            self.abort()

    def put(self, *msg) -> None:
        """Put with the writer's health checked, so a dead writer surfaces its error instead of a hang."""
        while True:
            if self.error is not None:
                raise self.error
            if not self.is_alive():
                raise RuntimeError("the shard writer stopped unexpectedly")
            try:
                self.inbox.put(msg, timeout=0.5)
                return
            except queue.Full:
                continue


def _batches(docs, tokenizer, cfg: HarvestConfig, start: CorpusPosition, limit: int | None, out: queue.Queue, stop: threading.Event):
    """Packer thread: put lists of up to batch_contexts contexts, then None."""
    try:
        batch = []
        n = 0
        for ctx in pack_contexts(docs, tokenizer, cfg.context, start):
            if stop.is_set():
                return
            batch.append(ctx)
            n += 1
            if len(batch) == cfg.batch_contexts:
                out.put(batch)
                batch = []
            if limit is not None and n >= limit:
                break
        if batch:
            out.put(batch)
        out.put(None)
    except BaseException as e:
        out.put(e)


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


# ---------------------------------------------------------------- the harvest
def _activation_rows(acts: dict, keys, d: int, dtype: str, where: str):
    """Stored rows and norm sums per key; non-finite values (e.g. float16 overflow) stop the run with their place."""
    rows, stats = {}, {}
    for key in keys:
        x = acts[key].reshape(-1, d)
        stored = x.to(torch.float16 if dtype == "float16" else torch.bfloat16)
        finite = torch.isfinite(stored).all(dim=-1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise StrataError(f"non-finite activation at {key}, token {where} + {bad}; float16 overflow? "
                              f"try --dtype bfloat16, or check the model")
        norms = x.float().norm(dim=-1)
        rows[key] = to_storage(stored, dtype)
        stats[key] = (float(norms.sum()), float((norms * norms).sum()), float(norms.max()))
    return rows, stats


def harvest(cfg: HarvestConfig, lm=None) -> Manifest:
    """Run the harvest described by `cfg`. `lm` is an already loaded model (a LoadedModel for cfg.model) to reuse."""
    _check_config(cfg)
    world = World()
    run = Path(cfg.run_dir)
    error = None
    if world.rank == 0:
        try:
            _prepare_run_dir(cfg, world)
        except StrataError as e:
            error = str(e)
    error = world.from_rank0(error)
    if error:
        raise StrataError(error)
    if layout.manifest_path(run).is_file() and load_manifest(run).complete:
        m = load_manifest(run)
        print(f"{run}: already complete ({m.n_tokens} tokens); nothing to do")
        return m

    lm = lm or load_model(cfg.model, cfg.device, cfg.model_dtype)
    keys = sorted(parse_keys(cfg.sites, cfg.layers, lm.info["n_layers"]), key=key_depth)
    d = lm.info["d_model"]
    mpath = world.manifest_path(run)
    if mpath.is_file():
        manifest = load_manifest(run, mpath)
        _drop_unlisted(run, manifest, world)
    else:
        manifest = Manifest(model=lm.info, tokenizer={"name_or_path": getattr(lm.tokenizer, "name_or_path", cfg.model),
                                                      "bos_per_context": wants_bos(lm.tokenizer),
                                                      "eos_token_id": lm.tokenizer.eos_token_id,
                                                      "bos_token_id": lm.tokenizer.bos_token_id},
                            keys=keys, dims={k: d for k in keys}, dtype=cfg.dtype, context_length=cfg.context,
                            config=cfg.identity(), corpus=describe(cfg), versions=software_versions())
        run.mkdir(parents=True, exist_ok=True)  # the manifest is first written with the first complete shard

    shard_contexts = max(1, round(cfg.shard_tokens / (cfg.context * cfg.batch_contexts))) * cfg.batch_contexts
    total_contexts = cfg.max_tokens // cfg.context if cfg.max_tokens else None
    # Continue after this process's last complete shard: the stream position and the global context index there.
    last = manifest.shards[-1] if manifest.shards else None
    start = CorpusPosition(**last.resume) if last else CorpusPosition()
    first_context = (last.index + 1) * shard_contexts if last else 0
    remaining = None if total_contexts is None else max(0, total_contexts - first_context)

    stop = threading.Event()
    batch_q: queue.Queue = queue.Queue(maxsize=cfg.queue_batches)
    packer = threading.Thread(target=_batches, daemon=True,
                              args=(documents(cfg, start.doc), lm.tokenizer, cfg, start, remaining, batch_q, stop))
    writer = _ShardWriterThread(run, manifest, mpath, shard_contexts * cfg.context, cfg.dtype, cfg.queue_batches)
    packer.start()
    writer.start()
    device = next(lm.model.parameters()).device
    bar = tqdm(total=None if total_contexts is None else total_contexts * cfg.context // world.size,
               initial=manifest.n_tokens, unit="tok", unit_scale=True, desc=f"harvest {run.name}",
               disable=not cfg.progress or world.rank != 0, dynamic_ncols=True)
    context_index = first_context
    open_shard = None
    try:
        while True:
            item = batch_q.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                break
            shard = context_index // shard_contexts
            context_index += len(item)
            if not world.owns(shard):
                continue
            if open_shard is not None and open_shard != shard:
                writer.put("commit", open_shard, None, None, None)
            open_shard = shard
            ids = torch.from_numpy(np.stack([c.token_ids for c in item])).long().to(device)
            rows, stats = _activation_rows(capture(lm.model, keys, ids), keys, d, cfg.dtype,
                                           where=f"{(context_index - len(item)) * cfg.context} (shard {shard})")
            writer.put("rows", shard, item, rows, stats)
            bar.update(len(item) * cfg.context)
        if open_shard is not None:
            writer.put("commit", open_shard, None, None, None)
        writer.put("stop", None, None, None, None)
        writer.join()
        if writer.error:
            raise writer.error
    except BaseException as e:
        stop.set()
        if writer.is_alive():
            _drain(batch_q)
            writer.inbox.put(("stop", None, None, None, None))
            writer.join()
        writer.abort()
        full = [x for x in (e, writer.error) if isinstance(x, OSError) and x.errno == errno.ENOSPC]
        if full:
            raise StrataError(f"disk full while writing {run}; the {len(manifest.shards)} complete shards are intact: "
                              f"free space and rerun with --resume") from None
        raise
    finally:
        bar.close()
        _drain(batch_q)
        if not manifest.shards and world.size == 1:  # nothing finished: leave no trace of a run that never produced a shard
            _remove_run_items(run)
            if run.is_dir() and not any(run.iterdir()):
                run.rmdir()
    return _finish(run, manifest, world, cfg)


def _finish(run: Path, manifest: Manifest, world: World, cfg: HarvestConfig) -> Manifest:
    if world.size > 1:
        save_manifest(run, manifest, world.manifest_path(run))
        world.barrier()
        if world.rank == 0:
            parts = [load_manifest(run, layout.part_manifest_path(run, r)) for r in range(world.size)
                     if layout.part_manifest_path(run, r).is_file()]
            manifest = merge_manifests(parts)
    if world.rank == 0:
        if manifest.n_tokens == 0:
            raise StrataError(f"the corpus gave no complete context of {cfg.context} tokens; add text or lower --context")
        manifest.complete = True
        save_manifest(run, manifest)
        if world.size > 1:
            shutil.rmtree(run / "parts")
    world.barrier()
    return load_manifest(run) if world.rank != 0 else manifest
