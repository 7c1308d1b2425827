"""`strata harvest`: text -> tokens -> one forward pass per batch with hooks -> per-layer HDF5 shards.

Three threads keep memory bounded whatever the corpus size: a packer turns documents into token batches,
the main thread runs the model (stopping after the deepest requested block), and a writer streams rows into
the current shard's files. Bounded queues sit between them, so writing overlaps the next forward.

Crash safety: shard files are written under temporary names and renamed when complete; the manifest is then
replaced atomically with the new shard's record (checksums, and the corpus position after it). `--resume`
drops anything not in the manifest and continues from the last complete shard, so a killed run loses at most
the shard in flight, and its files end up byte-identical to an uninterrupted run's.
"""
from __future__ import annotations

import errno
import queue
import shutil
import threading
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
from activations.manifest import (Manifest, ShardRecord, file_sha256, load_manifest, relpath, save_manifest,
                                  software_versions)
from activations.model import load_model
from activations.shards import ActivationShardWriter, to_storage, write_tokens
from activations.tokens import CorpusPosition, pack_contexts, wants_bos

_RUN_ITEMS = ("manifest.json", "tokens", "acts", "train", "index", "share")


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


def _prepare_run_dir(cfg: HarvestConfig) -> Manifest | None:
    """Returns the manifest to resume from, or None for a fresh run. Refuses to mix runs."""
    run = Path(cfg.run_dir)
    if run.exists() and not run.is_dir():
        raise StrataError(f"{run} is a file, not a directory; choose another run directory")
    has_manifest = layout.manifest_path(run).is_file()
    if cfg.overwrite and run.exists():
        _remove_run_items(run)
        has_manifest = False
    if not has_manifest and run.is_dir() and {p.name for p in run.iterdir()} <= set(_RUN_ITEMS):
        _remove_run_items(run)  # leftovers of a run killed before its first shard: nothing finished to keep
    if cfg.resume:
        if not has_manifest:
            if run.exists() and any(run.iterdir()):
                raise StrataError(f"{run} holds no manifest to resume from; remove the folder or pass --overwrite")
            return None
        manifest = load_manifest(run)
        diffs = [f"{k}: {manifest.config.get(k)!r} -> {v!r}" for k, v in cfg.identity().items() if manifest.config.get(k) != v]
        if diffs:
            raise StrataError(f"cannot resume {run} with a different config ({'; '.join(diffs)}); use the original flags or --overwrite")
        return manifest
    if has_manifest:
        old = load_manifest(run)
        same = old.config == cfg.identity()
        raise StrataError(f"{run} already holds {'this' if same else 'a different'} run ({old.n_tokens} tokens of {old.model['id']}); "
                          f"pass --resume to continue it or --overwrite to replace it")
    if run.exists() and any(run.iterdir()):
        raise StrataError(f"{run} is not empty and holds no Strata run; choose an empty folder or pass --overwrite")
    return None


def _remove_run_items(run: Path) -> None:
    for item in _RUN_ITEMS:
        p = run / item
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _drop_unlisted(run: Path, manifest: Manifest) -> None:
    """Remove partial files and shards written after the manifest's last update (a crash in between)."""
    listed = {run / f["path"] for s in manifest.shards for f in s.files.values()}
    for folder in [layout.tokens_dir(run)] + [layout.acts_dir(run, k) for k in manifest.keys]:
        if folder.is_dir():
            for p in folder.iterdir():
                if p not in listed:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()


class _ShardWriterThread(threading.Thread):
    """Consumes ("rows", contexts, {key: rows}, stats) and ("commit", None, None, None) messages."""

    def __init__(self, run: Path, manifest: Manifest, shard_rows: int, dtype: str):
        super().__init__(daemon=True)
        self.run_dir, self.manifest, self.shard_rows, self.dtype = run, manifest, shard_rows, dtype
        self.inbox: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._open: dict = {}

    def _start_shard(self):
        i = len(self.manifest.shards)
        self.tokens: list = []
        self.stats = {k: np.zeros(3) for k in self.manifest.keys}  # sum norm, sum sq norm, max norm
        self._ctx = {}
        for key in self.manifest.keys:
            path = layout.acts_shard_path(self.run_dir, key, i)
            ctx = atomic_path(path)
            tmp = ctx.__enter__()
            self._ctx[key] = ctx
            self._open[key] = ActivationShardWriter(tmp, self.manifest.dims[key], self.dtype, self.shard_rows)

    def _commit(self):
        m = self.manifest
        i = len(m.shards)
        files = {}
        rows = sum(len(c.token_ids) for c in self.tokens)
        tok_path = layout.tokens_shard_path(self.run_dir, i)
        with atomic_path(tok_path) as tmp:
            write_tokens(tmp, *(np.concatenate([getattr(c, f) for c in self.tokens]) for f in ("token_ids", "doc_ids", "positions")))
        files["tokens"] = {"path": relpath(self.run_dir, tok_path), "sha256": file_sha256(tok_path)}
        for key in m.keys:
            self._open.pop(key).close()
            self._ctx.pop(key).__exit__(None, None, None)
            path = layout.acts_shard_path(self.run_dir, key, i)
            files[key] = {"path": relpath(self.run_dir, path), "sha256": file_sha256(path)}
        for key, (s, sq, mx) in self.stats.items():
            ns = m.norm_stats.setdefault(key, {"count": 0, "sum_norm": 0.0, "sum_sq_norm": 0.0, "max_norm": 0.0})
            ns["count"] += rows
            ns["sum_norm"] += float(s)
            ns["sum_sq_norm"] += float(sq)
            ns["max_norm"] = max(ns["max_norm"], float(mx))
            ns["mean_norm"] = ns["sum_norm"] / ns["count"]
            ns["mean_sq_norm"] = ns["sum_sq_norm"] / ns["count"]
        end = self.tokens[-1].end
        m.shards.append(ShardRecord(index=i, rows=rows, token_start=m.n_tokens, files=files,
                                    resume={"doc": end.doc, "offset": end.offset}))
        m.n_tokens += rows
        save_manifest(self.run_dir, m)

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

    def run(self):  # noqa: D401 - thread body
        try:
            while True:
                kind, contexts, rows, stats = self.inbox.get()
                if kind == "stop":
                    return
                if kind == "commit":
                    self._commit()
                    continue
                if not self._open:
                    self._start_shard()
                self.tokens.extend(contexts)
                for key, block in rows.items():
                    self._open[key].append(block)
                for key, st in stats.items():
                    acc = self.stats[key]
                    acc[0] += st[0]
                    acc[1] += st[1]
                    acc[2] = max(acc[2], st[2])
        except BaseException as e:  # handed to the main thread
            self.error = e
            self.abort()


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


def harvest(cfg: HarvestConfig, lm=None) -> Manifest:
    """Run the harvest described by `cfg`. `lm` is an already loaded model (a LoadedModel for cfg.model) to reuse."""
    _check_config(cfg)
    run = Path(cfg.run_dir)
    resumed = _prepare_run_dir(cfg)
    if resumed is not None and resumed.complete:
        print(f"{run}: already complete ({resumed.n_tokens} tokens); nothing to do")
        return resumed
    lm = lm or load_model(cfg.model, cfg.device, cfg.model_dtype)
    keys = sorted(parse_keys(cfg.sites, cfg.layers, lm.info["n_layers"]), key=key_depth)
    d = lm.info["d_model"]
    if resumed is not None:
        manifest = resumed
        _drop_unlisted(run, manifest)
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
    done_contexts = manifest.n_tokens // cfg.context
    remaining = None if total_contexts is None else total_contexts - done_contexts
    start = CorpusPosition(**manifest.shards[-1].resume) if manifest.shards else CorpusPosition()

    stop = threading.Event()
    batch_q: queue.Queue = queue.Queue(maxsize=cfg.queue_batches)
    packer = threading.Thread(target=_batches, daemon=True,
                              args=(documents(cfg, start.doc), lm.tokenizer, cfg, start, remaining, batch_q, stop))
    writer = _ShardWriterThread(run, manifest, shard_contexts * cfg.context, cfg.dtype)
    writer.inbox = queue.Queue(maxsize=cfg.queue_batches)
    packer.start()
    writer.start()
    device = next(lm.model.parameters()).device
    bar = tqdm(total=None if total_contexts is None else total_contexts * cfg.context, initial=manifest.n_tokens,
               unit="tok", unit_scale=True, desc=f"harvest {run.name}", disable=not cfg.progress, dynamic_ncols=True)
    in_shard = 0
    try:
        while True:
            item = batch_q.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                break
            ids = torch.from_numpy(np.stack([c.token_ids for c in item])).long().to(device)
            acts = capture(lm.model, keys, ids)
            rows, stats = {}, {}
            for key in keys:
                x = acts[key].reshape(-1, d)
                stored = x.to(torch.float16 if cfg.dtype == "float16" else torch.bfloat16)
                finite = torch.isfinite(stored).all(dim=-1)
                if not bool(finite.all()):
                    bad = int((~finite).nonzero()[0, 0])
                    raise StrataError(f"non-finite activation at {key}, token {manifest.n_tokens + in_shard * cfg.context + bad} "
                                      f"(shard {len(manifest.shards)}); float16 overflow? try --dtype bfloat16, or check the model")
                norms = x.float().norm(dim=-1)
                rows[key] = to_storage(stored, cfg.dtype)
                stats[key] = (float(norms.sum()), float((norms * norms).sum()), float(norms.max()))
            _put(writer, ("rows", item, rows, stats))
            in_shard += len(item)
            bar.update(len(item) * cfg.context)
            if in_shard >= shard_contexts:
                _put(writer, ("commit", None, None, None))
                in_shard = 0
        if in_shard:
            _put(writer, ("commit", None, None, None))
        _put(writer, ("stop", None, None, None))
        writer.join()
        if writer.error:
            raise writer.error
    except BaseException as e:
        stop.set()
        if writer.is_alive():
            _drain(batch_q)
            writer.inbox.put(("stop", None, None, None))
            writer.join()
            writer.abort()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or isinstance(writer.error, OSError) and writer.error.errno == errno.ENOSPC:
            raise StrataError(f"disk full while writing shard {len(manifest.shards)} of {run}; the {len(manifest.shards)} "
                              f"complete shards are intact: free space and rerun with --resume") from None
        raise
    finally:
        bar.close()
        _drain(batch_q)
        if not manifest.shards:  # nothing finished: leave no trace of a run that never produced a shard
            _remove_run_items(run)
            if run.is_dir() and not any(run.iterdir()):
                run.rmdir()
    if manifest.n_tokens == 0:
        raise StrataError(f"the corpus gave no complete context of {cfg.context} tokens; add text or lower --context")
    manifest.complete = True
    save_manifest(run, manifest)
    return manifest


def _put(writer: _ShardWriterThread, msg) -> None:
    """Put with the writer's health checked, so a dead writer surfaces its error instead of a hang."""
    while True:
        if writer.error is not None:
            raise writer.error
        try:
            writer.inbox.put(msg, timeout=0.5)
            return
        except queue.Full:
            continue


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass

