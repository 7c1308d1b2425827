"""`strata harvest`: text -> tokens -> one forward pass per batch with hooks -> per-layer HDF5 shards.

Three threads keep memory bounded whatever the corpus size: a packer turns documents into token batches,
the main thread runs the model (stopping after the deepest requested block), and a writer streams rows into
the current shard's files. Bounded queues sit between them, so writing overlaps the next forward.

Crash safety: the manifest is written (atomically) before the first shard file, so shard files never exist
without a manifest that explains them. Shard files are written under temporary names and renamed when complete;
the manifest is then replaced atomically with the new shard's record (checksums, and the corpus position after
it). `--resume` drops anything not in the manifest, re-creates listed shard files that are missing or fail their
checksum (from the corpus position their shard started at), and continues from the last complete shard, so a
run killed at any point loses at most the shard in flight, and its files end up byte-identical to an
uninterrupted run's (tests/test_crash_safety_harvest.py). On a finished run, `--resume` only does the repair.

One harvest at a time: the whole harvest holds the run's lock exclusively (activations/lock.py), and the folder
rules (what a harvest may write into, and what --overwrite may delete) are in activations/harvest_dir.py.
Before each shard the free disk space is checked, because HDF5 does not survive a failed write.

Under `torchrun --nproc-per-node N` shard g belongs to rank g % N. Every rank reads the same token stream
(tokenizing is cheap next to the forward pass) but runs the model only on its own shards, and keeps its own
manifest in parts/; rank 0 merges them into manifest.json at the end. Shard boundaries and forward batches are
the same as in a single-process run, so the files are too.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import queue
import shutil
import threading
from dataclasses import dataclass
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
from activations.harvest_dir import (
    check_same_identity,
    check_target,
    clear_harvest,
    clear_leftovers,
    part_manifests,
    resume_command,
)
from activations.hooks import capture, key_depth, parse_keys
from activations.lock import run_lock
from activations.manifest import (
    Manifest,
    ShardRecord,
    add_norm_stats,
    file_sha256,
    load_manifest,
    merge_manifests,
    relpath,
    save_manifest,
    software_versions,
)
from activations.model import forward_matmul_shapes, load_model, resolve_device, resolve_dtype
from activations.precision import DTYPES, Precision, bf16_supported, resolve
from activations.shards import ActivationShardWriter, to_storage, write_tokens
from activations.tokens import CorpusPosition, pack_contexts, wants_bos


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

    def close(self) -> None:
        """Leave the process group once every rank is done (gloo can abort a process that exits with it open)."""
        if self.size > 1 and self.dist.is_initialized():
            self.dist.destroy_process_group()

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
    if cfg.precision == "bf16" and cfg.model_dtype == "auto" and not bf16_supported(resolve_device(cfg.device)):
        raise StrataError(f"--precision bf16: device {cfg.device} has no bf16 support; use --precision fp32 or auto")


def _created_root(run: Path) -> Path | None:
    """The outermost folder that `run.mkdir(parents=True)` would create, or None when `run` exists."""
    if run.exists():
        return None
    top = run
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def _claim_run_dir(cfg: HarvestConfig, world: World, held: contextlib.ExitStack) -> Path | None:
    """Rank 0 only: refuse a folder a harvest may not use, create the folder, take the run lock (held for the whole
    harvest), apply --overwrite, and check an existing run against this config. Returns the outermost folder this
    call created (None if the run folder existed)."""
    run = Path(cfg.run_dir)
    check_target(cfg)  # before anything is created: a refused folder stays untouched
    created = _created_root(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StrataError(f"cannot create the run directory {run} ({e.strerror}); choose a writable location") from None
    try:
        held.enter_context(run_lock(run, "strata harvest"))
    except StrataError:
        _remove_created(run, created)
        raise
    try:
        _check_claimed(cfg, world, run)
    except BaseException:
        if created is not None:  # a folder this call made holds nothing but the lock
            _forget_unfinished(run, created)
        raise
    return created


def _check_claimed(cfg: HarvestConfig, world: World, run: Path) -> None:
    """Under the lock: the folder may have changed since the first look."""
    if check_target(cfg) and cfg.overwrite:
        clear_harvest(run)
    clear_leftovers(run)
    has_main = layout.manifest_path(run).is_file()
    parts = part_manifests(run)
    if has_main and (load_manifest(run).complete or world.size == 1) and parts:
        shutil.rmtree(layout.parts_dir(run))  # left by a kill after the merged manifest was saved
        parts = []
    if parts and world.size == 1 or has_main and world.size > 1 and not load_manifest(run).complete:
        raise StrataError(f"{run} was started with a different number of processes; resume it the way it was started")
    if not (has_main or parts):
        return
    old = load_manifest(run, layout.manifest_path(run) if has_main else parts[0])
    if not cfg.resume:
        same = old.config == cfg.identity()
        raise StrataError(f"{run} already holds {'this' if same else 'a different'} run ({old.n_tokens} tokens of "
                          f"{old.model['id']}); pass --resume to continue it or --overwrite to replace it")
    check_same_identity(run, old.config, cfg.identity())


def _remove_created(run: Path, created: Path | None) -> None:
    """Remove the folders this harvest created (run up to `created`) while they are empty."""
    if created is None:
        return
    folder = run
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return
        folder = folder.parent


def _forget_unfinished(run: Path, created: Path | None) -> None:
    """After a harvest that finished no shard: remove what it wrote, so the folder is as it was (lock held)."""
    if _has_shards(run):
        return
    clear_harvest(run)
    if run.is_dir() and {p.name for p in run.iterdir()} <= {layout.LOCK}:
        layout.lock_path(run).unlink(missing_ok=True)  # still held through our descriptor; others are refused
        _remove_created(run, created)


def _has_shards(run: Path) -> bool:
    """Whether any manifest in `run` (main or per-process) lists a complete shard."""
    for path in [layout.manifest_path(run), *part_manifests(run)]:
        if path.is_file():
            try:
                if load_manifest(run, path).shards:
                    return True
            except StrataError:
                return True  # unreadable: not ours to judge, keep it
    return False


def _drop_unlisted(run: Path, manifest: Manifest, world: World) -> None:
    """Remove this process's partial files and shards written after its manifest's last update (shard files only:
    anything else a user keeps in these folders stays)."""
    listed = {run / f["path"] for s in manifest.shards for f in s.files.values()}
    for folder in [layout.tokens_dir(run)] + [layout.acts_dir(run, k) for k in manifest.keys]:
        if folder.is_dir():
            for p in folder.iterdir():
                i = layout.shard_index(p)
                if p not in listed and i is not None and world.owns(i):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()


# ---------------------------------------------------------------- the writer thread
class _ShardWriterThread(threading.Thread):
    """Consumes ("rows", shard, contexts, {key: rows}, stats), ("commit", shard, ...) and ("stop", ...) messages.

    Normally each committed shard is appended to the manifest. With `recreate` ({shard: names of its files}) it
    re-writes only those files of shards the manifest already lists (their originals are missing or damaged)."""

    def __init__(self, run: Path, manifest: Manifest, manifest_path: Path, shard_rows: int, dtype: str, inbox_size: int,
                 recreate: dict | None = None):
        super().__init__(daemon=True)
        self.run_dir, self.manifest, self.manifest_path = run, manifest, manifest_path
        self.shard_rows, self.dtype = shard_rows, dtype
        self.recreate = recreate
        self.inbox: queue.Queue = queue.Queue(maxsize=inbox_size)
        self.error: BaseException | None = None
        self.changed: list[str] = []  # re-created files whose bytes differ from the manifest's record
        self._shard: int | None = None  # the shard being written
        self._open: dict = {}
        self._ctx: dict = {}

    def _names(self, i: int) -> list[str]:
        return ["tokens", *self.manifest.keys] if self.recreate is None else sorted(self.recreate[i])

    def _check_space(self, i: int) -> None:
        """Stop before a shard that cannot fit: HDF5 does not recover from a failed write (it crashes at exit)."""
        names = self._names(i)
        need = self.shard_rows * (16 * ("tokens" in names) + sum(2 * self.manifest.dims[k] for k in names if k != "tokens"))
        need = int(need * 1.05) + len(names) * (64 << 10)  # HDF5 metadata and chunk index per file
        free = shutil.disk_usage(self.run_dir).free
        if free < need:
            raise StrataError(f"disk full: {self.run_dir} has {free / 2**20:.0f} MiB free but shard {i} needs about "
                              f"{need / 2**20:.0f} MiB; the {len(self.manifest.shards)} complete shards are intact: "
                              f"free space, then `{resume_command(self.run_dir, self.manifest.config)}`")

    def _start_shard(self, i: int):
        self._check_space(i)
        self._shard = i
        self.tokens: list = []
        self.stats = {k: np.zeros(3) for k in self.manifest.keys}  # sum norm, sum sq norm, max norm
        for key in self._names(i):
            if key == "tokens":
                continue
            ctx = atomic_path(layout.acts_shard_path(self.run_dir, key, i))
            self._ctx[key] = ctx
            self._open[key] = ActivationShardWriter(ctx.__enter__(), self.manifest.dims[key], self.dtype, self.shard_rows)

    def _commit(self, i: int):
        m = self.manifest
        names = self._names(i)
        self._shard = None
        rows = sum(len(c.token_ids) for c in self.tokens)
        files = {}
        if "tokens" in names:
            tok_path = layout.tokens_shard_path(self.run_dir, i)
            with atomic_path(tok_path) as tmp:
                write_tokens(tmp, *(np.concatenate([getattr(c, f) for c in self.tokens]) for f in ("token_ids", "doc_ids", "positions")))
            files["tokens"] = {"path": relpath(self.run_dir, tok_path), "sha256": file_sha256(tok_path)}
        for key in [k for k in names if k != "tokens"]:
            self._open.pop(key).close()
            self._ctx.pop(key).__exit__(None, None, None)
            path = layout.acts_shard_path(self.run_dir, key, i)
            files[key] = {"path": relpath(self.run_dir, path), "sha256": file_sha256(path)}
        if self.recreate is not None:
            record = next(s for s in m.shards if s.index == i)
            differ = [name for name, f in files.items() if record.files.get(name) != f]
            if differ:  # e.g. a model that is not deterministic on this device: the new file is sound, record it
                record.files.update({name: files[name] for name in differ})
                self.changed += [files[name]["path"] for name in differ]
                save_manifest(self.run_dir, m, self.manifest_path)
            return
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
                if self._shard != shard:
                    self._start_shard(shard)
                self.tokens.extend(contexts)
                for key, block in rows.items():
                    if key in self._open:
                        self._open[key].append(block)
                for key, (s, sq, mx) in stats.items():
                    acc = self.stats[key]
                    acc[0] += s
                    acc[1] += sq
                    acc[2] = max(acc[2], mx)
        except BaseException as e:  # handed to the main thread
            self.error = e
            self.abort()

    def stop(self) -> None:
        """Ask the writer to stop and wait for it; never blocks on a full inbox if the writer has died meanwhile."""
        while self.is_alive():
            try:
                self.inbox.put(("stop", None, None, None, None), timeout=0.5)
                break
            except queue.Full:
                continue
        self.join()

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
    """Packer thread: put lists of up to batch_contexts contexts (at most `limit` contexts in all), then None."""
    try:
        batch = []
        for ctx in itertools.islice(pack_contexts(docs, tokenizer, cfg.context, start), limit):
            if stop.is_set():
                return
            batch.append(ctx)
            if len(batch) == cfg.batch_contexts:
                out.put(batch)
                batch = []
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
        stored = acts[key].reshape(-1, d).to(torch.float16 if dtype == "float16" else torch.bfloat16)
        # the stored rows' norms, accumulated in fp32 without an fp32 copy; a row holding inf/NaN has a non-finite
        # norm, so one pass both checks and measures (a separate isfinite pass cost as much as the rest together)
        norms = torch.linalg.vector_norm(stored, dim=-1, dtype=torch.float32)
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise StrataError(f"non-finite activation at {key}, token {where} + {bad}; float16 overflow? "
                              f"try --dtype bfloat16, or check the model")
        rows[key] = to_storage(stored, dtype)
        stats[key] = (float(norms.sum()), float((norms * norms).sum()), float(norms.max()))
    return rows, stats


@dataclass
class _Plan:
    """What one pass of the pipeline produces: contexts [first_context, first_context + limit) of the corpus,
    starting at corpus position `start`, cut into shards of `shard_contexts` contexts."""
    start: CorpusPosition
    first_context: int
    limit: int | None
    shard_contexts: int


def harvest(cfg: HarvestConfig, lm=None) -> Manifest:
    """Run the harvest described by `cfg`. `lm` is an already loaded model (a LoadedModel for cfg.model) to reuse."""
    _check_config(cfg)
    world = World()
    run = Path(cfg.run_dir)
    with contextlib.ExitStack() as held:  # rank 0 holds the run lock until the harvest has ended, however it ends
        error, created = None, None
        if world.rank == 0:
            try:
                created = _claim_run_dir(cfg, world, held)
            except StrataError as e:
                error = str(e)
        error = world.from_rank0(error)
        if error:
            raise StrataError(error)
        try:
            return _harvest_claimed(cfg, world, run, lm)
        except BaseException:
            if world.size == 1:
                with contextlib.suppress(OSError):  # e.g. a read-only folder: the original error matters
                    _forget_unfinished(run, created)
            raise


def _harvest_claimed(cfg: HarvestConfig, world: World, run: Path, lm) -> Manifest:
    if layout.manifest_path(run).is_file() and load_manifest(run).complete:
        return _repair_complete(cfg, world, run, lm)
    mpath = world.manifest_path(run)
    lm, precision = _load_model(cfg, lm, load_manifest(run, mpath).precision if mpath.is_file() else {})
    keys = sorted(parse_keys(cfg.sites, cfg.layers, lm.info["n_layers"]), key=key_depth)
    d = lm.info["d_model"]
    if mpath.is_file():
        manifest = load_manifest(run, mpath)
        _drop_unlisted(run, manifest, world)
    else:
        manifest = Manifest(model=lm.info, tokenizer={"name_or_path": getattr(lm.tokenizer, "name_or_path", cfg.model),
                                                      "bos_per_context": wants_bos(lm.tokenizer),
                                                      "eos_token_id": lm.tokenizer.eos_token_id,
                                                      "bos_token_id": lm.tokenizer.bos_token_id},
                            keys=keys, dims={k: d for k in keys}, dtype=cfg.dtype, context_length=cfg.context,
                            config=cfg.identity(), corpus=describe(cfg), versions=software_versions(),
                            precision=precision)
        # Written before the first shard file: shard files never exist without a manifest that explains them.
        _save_or_stop(run, manifest, mpath)

    shard_contexts = _shard_contexts(cfg)
    if world.size == 1:
        _recreate(cfg, lm, run, manifest, mpath, shard_contexts)
    total_contexts = cfg.max_tokens // cfg.context if cfg.max_tokens else None
    # Continue after this process's last complete shard: the stream position and the global context index there.
    last = manifest.shards[-1] if manifest.shards else None
    first_context = (last.index + 1) * shard_contexts if last else 0
    plan = _Plan(start=CorpusPosition(**last.resume) if last else CorpusPosition(), first_context=first_context,
                 limit=None if total_contexts is None else max(0, total_contexts - first_context),
                 shard_contexts=shard_contexts)
    writer = _ShardWriterThread(run, manifest, mpath, shard_contexts * cfg.context, cfg.dtype, cfg.queue_batches)
    total = None if total_contexts is None else total_contexts * cfg.context // world.size
    _produce(cfg, lm, keys, world, run, plan, writer, manifest, progress=(total, manifest.n_tokens))
    return _finish(run, manifest, world, cfg)


def _shard_contexts(cfg: HarvestConfig) -> int:
    return max(1, round(cfg.shard_tokens / (cfg.context * cfg.batch_contexts))) * cfg.batch_contexts


def _save_or_stop(run: Path, manifest: Manifest, path: Path) -> None:
    try:
        save_manifest(run, manifest, path)
    except OSError as e:
        raise _write_error(run, manifest, e) from None


def _write_error(run: Path, manifest: Manifest, e: OSError) -> StrataError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StrataError(f"disk full while writing {run}; the {len(manifest.shards)} complete shards are intact: "
                           f"free space, then `{resume_command(run, manifest.config)}`")
    return StrataError(f"cannot write to {run} ({e.strerror or e}); check that it is writable, then "
                       f"`{resume_command(run, manifest.config)}`")


def _damaged(run: Path, manifest: Manifest) -> dict[int, set[str]]:
    """{shard index: names of its files} for every listed file that is missing or fails its sha256."""
    bad: dict[int, set[str]] = {}
    for s in manifest.shards:
        for name in ["tokens", *manifest.keys]:
            rec = s.files.get(name)
            path = run / rec["path"] if rec else None
            if path is None or not path.is_file() or file_sha256(path) != rec["sha256"]:
                bad.setdefault(s.index, set()).add(name)
    return bad


def _recreate(cfg: HarvestConfig, lm, run: Path, manifest: Manifest, mpath: Path, shard_contexts: int) -> None:
    """Re-create the listed shard files that are missing or damaged, each from the corpus position its shard
    started at, with the same forward batches: byte-identical to the originals (on a deterministic device)."""
    bad = _damaged(run, manifest)
    if not bad:
        return
    keys = list(manifest.keys)
    by_index = {s.index: pos for pos, s in enumerate(manifest.shards)}
    n_files = sum(len(v) for v in bad.values())
    print(f"{run}: re-creating {n_files} missing or damaged file(s) in {len(bad)} shard(s)")
    changed = []
    for i in sorted(bad):
        pos = by_index[i]
        if manifest.shards[pos].token_start != i * shard_contexts * cfg.context or pos and manifest.shards[pos - 1].index != i - 1:
            raise StrataError(f"shard {i} of {run} cannot be re-created: its neighbours are not in the manifest; "
                              f"re-harvest with --overwrite")
        start = CorpusPosition(**manifest.shards[pos - 1].resume) if pos else CorpusPosition()
        plan = _Plan(start=start, first_context=i * shard_contexts,
                     limit=manifest.shards[pos].rows // cfg.context, shard_contexts=shard_contexts)
        writer = _ShardWriterThread(run, manifest, mpath, shard_contexts * cfg.context, cfg.dtype, cfg.queue_batches,
                                    recreate={i: bad[i]})
        _produce(cfg, lm, keys, World(), run, plan, writer, manifest, progress=(plan.limit * cfg.context, 0))
        changed += writer.changed
    if changed:
        print(f"{run}: {len(changed)} re-created file(s) differ from the original bytes (is the model deterministic on "
              f"this device?); the manifest now records them: {', '.join(changed[:3])}")


def _repair_complete(cfg: HarvestConfig, world: World, run: Path, lm) -> Manifest:
    """`--resume` on a finished run: re-create whatever the manifest lists but is missing or damaged."""
    m = load_manifest(run)
    if world.size > 1:
        if world.rank == 0:
            print(f"{run}: already complete ({m.n_tokens} tokens); to re-create damaged shards run "
                  f"`{resume_command(run, m.config)}` in one process")
        return m
    if not _damaged(run, m):
        print(f"{run}: already complete ({m.n_tokens} tokens) and every shard matches the manifest; nothing to do")
        return m
    lm, _ = _load_model(cfg, lm, m.precision)
    _recreate(cfg, lm, run, m, layout.manifest_path(run), _shard_contexts(cfg))
    print(f"{run}: every shard matches the manifest again")
    return m


def _load_model(cfg: HarvestConfig, lm, recorded: dict):
    """(the model in the dtype it runs in, {"precision", "reason"} for the manifest). An explicit --model-dtype
    wins over --precision; a model passed in runs as it was loaded; `--precision auto` on a run that `recorded`
    a precision keeps it (its shards stay comparable)."""
    if lm is not None:
        dt = next(lm.model.parameters()).dtype
        record = {"precision": _PRECISION_OF.get(dt, str(dt).removeprefix("torch.")), "reason": "the model passed in"}
    elif cfg.model_dtype != "auto":
        lm = load_model(cfg.model, cfg.device, cfg.model_dtype)
        record = {"precision": _PRECISION_OF.get(resolve_dtype(cfg.model_dtype), cfg.model_dtype),
                  "reason": f"--model-dtype {cfg.model_dtype}"}
    else:
        device = resolve_device(cfg.device)
        lm = load_model(cfg.model, device, "float32")
        if cfg.precision == "auto" and recorded.get("precision") in DTYPES:  # a resume continues as the run began
            prec = Precision(recorded["precision"], "as this run was harvested so far")
        else:
            prec = resolve(cfg.precision, device, forward_matmul_shapes(lm, cfg.batch_contexts * cfg.context))
        if prec.name != "fp32":
            lm.model.to(prec.dtype)
        record = prec.record()
    print(f"precision: {record['precision']} ({record['reason']})")
    if recorded.get("precision", record["precision"]) != record["precision"]:
        print(f"note: this run was harvested in {recorded['precision']} so far; it continues in {record['precision']}")
    return lm, record


_PRECISION_OF = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _produce(cfg: HarvestConfig, lm, keys, world: World, run: Path, plan: _Plan, writer: _ShardWriterThread,
             manifest: Manifest, progress: tuple) -> None:
    """Run the packer -> model -> writer pipeline over `plan` until the writer has committed its last shard."""
    d = lm.info["d_model"]
    stop = threading.Event()
    batch_q: queue.Queue = queue.Queue(maxsize=cfg.queue_batches)
    packer = threading.Thread(target=_batches, daemon=True,
                              args=(documents(cfg, plan.start.doc), lm.tokenizer, cfg, plan.start, plan.limit, batch_q, stop))
    packer.start()
    writer.start()
    device = next(lm.model.parameters()).device
    total, initial = progress
    bar = tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=f"harvest {run.name}",
               disable=not cfg.progress or world.rank != 0, dynamic_ncols=True)
    context_index = plan.first_context
    open_shard = None
    try:
        while True:
            item = batch_q.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                break
            shard = context_index // plan.shard_contexts
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
        _drain(batch_q)
        writer.stop()
        writer.abort()
        failed = next((x for x in (e, writer.error) if isinstance(x, OSError) and x.errno is not None), None)
        if failed is not None:
            raise _write_error(run, manifest, failed) from None
        raise
    finally:
        bar.close()
        _drain(batch_q)


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
        _save_or_stop(run, manifest, layout.manifest_path(run))
        if world.size > 1:
            shutil.rmtree(layout.parts_dir(run))
    world.barrier()
    result = load_manifest(run) if world.rank != 0 else manifest
    world.close()
    return result
