"""Reading a harvest run back: random access by token index (`RunStore`) and shuffled batch streams for
training (`ActivationReader`).

Shuffling never reads rows one by one (fancy indexing on disk is slow in HDF5). Each shard is cut into
chunk-aligned blocks; every epoch visits the blocks in a seeded random order, loads a window of blocks into a
RAM mixing buffer (bounded by `buffer_bytes`), permutes the rows of the window, and emits batches. Each token
appears exactly once per epoch, the order depends only on (seed, epoch), and batch n can be reached without
reading anything before it, so training resumes exactly where it stopped.
"""
from __future__ import annotations

import math
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from activations.errors import StrataError
from activations.harvest_dir import resume_command
from activations.manifest import Manifest, file_sha256, load_manifest
from activations.shards import (
    ACTS,
    CHUNK_SUMS,
    TOKEN_FIELDS,
    chunk_rows,
    has_checksums,
    rows_hash,
)


class RunStore:
    """A harvest run opened for reading. HDF5 handles are opened lazily and are not pickled, so a store can be
    passed to worker processes.

    Damaged data is never returned: each chunk of an activation file is checked against its xxh3 hash
    (activations/shards.py) the first time this store reads it (hashing the rows just read, so a chunk-aligned
    read costs no extra I/O), token files carry HDF5's fletcher32, and a file written without checksums is
    checked against the manifest's sha256 when first opened (unless `check_unfiltered` is False). Any failure is
    a StrataError naming the file and how to re-create it."""

    def __init__(self, run, check_unfiltered: bool = True):
        self.path = Path(run)
        self.check_unfiltered = check_unfiltered
        self.manifest: Manifest = load_manifest(self.path)
        if not self.manifest.shards:
            raise StrataError(f"{run} has no complete shard yet; finish it with `strata harvest {run} --resume`")
        self.starts = np.array([s.token_start for s in self.manifest.shards] + [self.manifest.n_tokens], dtype=np.int64)
        self._files: dict = {}
        self._sums: dict = {}  # (key, shard) -> (stored chunk hashes, chunk rows, bool array: chunk checked)
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_sums"], state["_lock"] = {}, {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ---- description
    @property
    def keys(self) -> list[str]:
        return list(self.manifest.keys)

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    @property
    def shard_ids(self) -> list[int]:
        return [s.index for s in self.manifest.shards]

    def d(self, key: str) -> int:
        self.check_keys([key])
        return int(self.manifest.dims[key])

    def check_keys(self, keys) -> None:
        missing = [k for k in keys if k not in self.manifest.dims]
        if missing:
            raise StrataError(f"run {self.path} has no activations for {missing[0]} (it has {', '.join(self.keys)}); "
                              f"choose one of those or harvest that site/layer")

    def split(self, heldout_fraction: float = 0.1) -> tuple[list[int], list[int]]:
        """Whole shards: the last ones are held out (at least one when the run has two or more)."""
        ids = self.shard_ids
        if len(ids) < 2 or heldout_fraction <= 0:
            return ids, []
        h = min(len(ids) - 1, max(1, round(len(ids) * heldout_fraction)))
        return ids[:-h], ids[-h:]

    def shard_rows(self, i: int) -> int:
        return int(self.manifest.shards[i].rows)

    # ---- raw access
    def _damaged(self, path: Path, detail) -> StrataError:
        first = (str(detail).strip().splitlines() or ["unreadable"])[0][:160]
        return StrataError(f"shard file {path} is damaged ({first}); list every damaged shard with `strata verify "
                           f"{self.path}`, then re-create them with `{resume_command(self.path, self.manifest.config)}`")

    def _path(self, name: str, i: int) -> Path:
        rec = self.manifest.shards[i].files.get(name)
        if rec is None:
            raise StrataError(f"shard {i} of {self.path} has no {name} file in its manifest; re-harvest with --overwrite")
        return self.path / rec["path"]

    def _file(self, name: str, i: int) -> h5py.File:
        with self._lock:
            f = self._files.get((name, i))
            if f is None:
                path = self._path(name, i)
                try:
                    f = h5py.File(path, "r")
                    checked = has_checksums(f)
                except (OSError, KeyError) as e:
                    raise self._damaged(path, e) from None
                # written without checksums: the whole file against the manifest's sha256
                if not checked and self.check_unfiltered and file_sha256(path) != self.manifest.shards[i].files[name]["sha256"]:
                    f.close()
                    raise self._damaged(path, "its sha256 differs from the manifest's")
                if checked and name != "tokens":
                    sums = f[CHUNK_SUMS][:]
                    self._sums[(name, i)] = (sums, f[ACTS].chunks[0], np.zeros(len(sums), dtype=bool))
                self._files[(name, i)] = f
            return f

    def _read(self, key: str, i: int, read):
        try:
            return read(self._file(key, i)[ACTS])
        except (OSError, KeyError) as e:  # a broken file
            raise self._damaged(self._path(key, i), e) from None

    def check_chunks(self, key: str, i: int, start: int, stop: int, rows: np.ndarray | None = None) -> None:
        """Check every chunk that rows [start, stop) touch and this store has not checked yet; `rows` holds those
        rows when they were just read (whole chunks inside them are hashed there, the others are read whole)."""
        if (key, i) not in self._sums:
            return  # a file without chunk hashes: checked whole when opened
        sums, step, done = self._sums[(key, i)]
        n = self.shard_rows(i)
        for c in range(start // step, (max(start, stop) - 1) // step + 1):
            if done[c]:
                continue
            a, b = c * step, min(c * step + step, n)
            block = rows[a - start:b - start] if rows is not None and start <= a and b <= stop \
                else self._read(key, i, lambda ds, a=a, b=b: ds[a:b])
            if rows_hash(block) != int(sums[c]):
                raise self._damaged(self._path(key, i), f"rows {a}-{b - 1} differ from their checksum")
            done[c] = True

    def _check_rows(self, key: str, i: int, rows: np.ndarray) -> None:
        """Check the chunks holding rows `rows` of shard i (each read whole, once)."""
        if (key, i) in self._sums:
            step = self._sums[(key, i)][1]
            for c in np.unique(rows // step):
                self.check_chunks(key, i, int(c) * step, int(c) * step + 1)

    def read_block(self, key: str, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Stored rows [start, stop) of shard i, in the storage dtype (float16, or uint16 for bfloat16)."""
        block = self._read(key, i, lambda ds: ds[start:stop])
        self.check_chunks(key, i, start, start + len(block), block)
        return block

    def read_into(self, key: str, i: int, start: int, stop: int, out: np.ndarray, check: bool = True) -> None:
        """Stored rows [start, stop) of shard i written straight into `out` (no intermediate copy). With
        check=False the caller must call `check_chunks(key, i, start, stop, out)` before using the rows."""
        self._read(key, i, lambda ds: ds.read_direct(out, np.s_[start:stop], np.s_[0:stop - start]))
        if check:
            self.check_chunks(key, i, start, stop, out)

    def storage_tensor(self, a: np.ndarray) -> torch.Tensor:
        """A torch view of stored rows: float16, or bfloat16 (stored as uint16)."""
        t = torch.from_numpy(a)
        return t.view(torch.bfloat16) if self.manifest.dtype == "bfloat16" else t

    def to_float(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.manifest.dtype == "bfloat16":
            return t.view(torch.int16).view(torch.bfloat16).float()
        return t.float()

    def _locate(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_tokens):
            raise StrataError(f"token index out of range 0-{self.n_tokens - 1} for {self.path}")
        return np.searchsorted(self.starts, rows, side="right") - 1

    def read_rows(self, key: str, rows) -> np.ndarray:
        """Activations [len(rows), d] float32 for global token indices `rows` (any order, repeats allowed)."""
        self.check_keys([key])
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.d(key)), dtype=np.float32)
        shard = self._locate(rows)
        for i in np.unique(shard):
            sel = np.nonzero(shard == i)[0]
            local = rows[sel] - self.starts[i]
            uniq, inverse = np.unique(local, return_inverse=True)
            lo, hi = int(uniq[0]), int(uniq[-1]) + 1
            if hi - lo <= 4 * len(uniq) + 1024:  # nearby rows: one contiguous read beats fancy indexing
                block = self.read_block(key, int(i), lo, hi)[uniq - lo]
            else:
                block = self._read(key, int(i), lambda ds, wanted=uniq: ds[wanted])
                self._check_rows(key, int(i), uniq)
            out[sel] = self.to_float(block).numpy()[inverse]
        return out

    def read_tokens(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """token_ids, doc_ids, positions of global rows [start, stop)."""
        start, stop = max(0, start), min(stop, self.n_tokens)
        parts = []
        for i in range(len(self.manifest.shards)):
            a, b = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if a < b:
                lo, hi = int(a - self.starts[i]), int(b - self.starts[i])
                f = self._file("tokens", i)
                try:
                    parts.append({name: f[name][lo:hi] for name in TOKEN_FIELDS})
                except (OSError, KeyError) as e:
                    raise self._damaged(self._path("tokens", i), e) from None
        if not parts:
            return {"token_ids": np.zeros(0, np.int32), "doc_ids": np.zeros(0, np.int64), "positions": np.zeros(0, np.int32)}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
            self._sums.clear()


def open_run(run, check_unfiltered: bool = True) -> RunStore:
    return RunStore(run, check_unfiltered)


@dataclass
class ActivationBatch:
    acts: dict  # key -> float Tensor [B, d]
    rows: torch.Tensor  # int64 [B]: global token index of each row


class ActivationReader:
    """Shuffled (or sequential) batches of the same tokens for one or several keys."""

    def __init__(self, run, keys, batch_size: int, shards=None, shuffle: bool = True, seed: int = 0, epochs: int = 1,
                 drop_last: bool = False, start_batch: int = 0, prefetch: int = 2, dtype=torch.float32,
                 buffer_bytes: int = 1 << 30, block_rows: int | None = None, exclude_first: int = 0):
        self.store = run if isinstance(run, RunStore) else open_run(run)
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.store.check_keys(self.keys)
        if batch_size < 1:
            raise StrataError(f"batch size {batch_size} must be positive")
        self.shards = list(self.store.shard_ids if shards is None else shards)
        bad = [s for s in self.shards if s not in self.store.shard_ids]
        if bad or not self.shards:
            raise StrataError(f"shard {bad[0] if bad else '(none)'} is not in {self.store.path}; "
                              f"it has shards 0-{len(self.store.shard_ids) - 1}")
        self.batch_size, self.shuffle, self.seed, self.epochs = batch_size, shuffle, seed, epochs
        self.drop_last, self.start_batch, self.prefetch, self.dtype = drop_last, start_batch, prefetch, dtype
        d_sum = sum(self.store.d(k) for k in self.keys)
        chunk = chunk_rows(max(self.store.d(k) for k in self.keys))
        self.block_rows = block_rows or max(chunk, (4 << 20) // (2 * max(self.store.d(k) for k in self.keys)) // chunk * chunk)
        self.blocks = [(s, a, min(a + self.block_rows, self.store.shard_rows(s)))
                       for s in self.shards for a in range(0, self.store.shard_rows(s), self.block_rows)]
        self.window_blocks = max(1, buffer_bytes // (2 * d_sum * self.block_rows))
        self.exclude_first = exclude_first
        self.n_rows = sum(len(self._kept(self._token_rows([blk]))) for blk in self.blocks)
        self.batches_per_epoch = self.n_rows // batch_size if drop_last else math.ceil(self.n_rows / batch_size)
        if self.batches_per_epoch == 0:
            raise StrataError(f"batch size {batch_size} exceeds the {self.n_rows} tokens in the chosen shards; lower it")

    def _token_rows(self, blocks) -> np.ndarray:
        return np.concatenate([np.arange(a, b) + self.store.starts[s] for s, a, b in blocks])

    def _kept(self, tok: np.ndarray) -> np.ndarray:
        """Window positions of the rows to use: all, or those past the first `exclude_first` of each context
        (shards hold whole contexts, so a row's position in its context is its index modulo the context length)."""
        if not self.exclude_first:
            return np.arange(len(tok))
        return np.nonzero(tok % self.store.manifest.context_length >= self.exclude_first)[0]

    def __len__(self) -> int:
        return self.batches_per_epoch * self.epochs

    def _epoch_batches(self, epoch: int, skip: int, checker: ThreadPoolExecutor):
        """Yield (index arrays into windows) batches of one epoch, skipping the first `skip` batches."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.blocks)) if self.shuffle else np.arange(len(self.blocks))
        windows = [order[i:i + self.window_blocks] for i in range(0, len(order), self.window_blocks)]
        skip_rows = skip * self.batch_size
        carry: list = []  # pieces of a batch that spans windows: (window arrays, row indices)
        carry_n = 0
        for w in windows:
            blocks = [self.blocks[j] for j in w]
            tok = self._token_rows(blocks)
            kept = self._kept(tok)
            n = len(kept)
            perm = kept[rng.permutation(n)] if self.shuffle else kept
            if skip_rows >= n:
                skip_rows -= n
                continue
            data = {k: self._read_window(k, blocks, len(tok), checker) for k in self.keys}
            pos = skip_rows
            skip_rows = 0
            while pos < n:
                take = min(self.batch_size - carry_n, n - pos)
                carry.append((data, tok, perm[pos:pos + take]))
                carry_n += take
                pos += take
                if carry_n == self.batch_size:
                    yield carry
                    carry, carry_n = [], 0
        if carry and not self.drop_last:
            yield carry

    def _read_window(self, key: str, blocks, rows: int, checker: ThreadPoolExecutor) -> torch.Tensor:
        """The window's rows of `key`, read block by block into one buffer, as a storage-dtype tensor. Each block's
        checksums are checked on `checker`'s thread while the next block is read; all pass before it is returned."""
        buf = np.empty((rows, self.store.d(key)), dtype=np.uint16 if self.store.manifest.dtype == "bfloat16" else np.float16)
        at = 0
        checks = []
        for s, a, b in blocks:
            part = buf[at:at + b - a]
            self.store.read_into(key, s, a, b, part, check=False)
            checks.append(checker.submit(self.store.check_chunks, key, s, a, b, part))
            at += b - a
        for c in checks:
            c.result()  # raises the StrataError of a damaged block
        return self.store.storage_tensor(buf)

    def _assemble(self, pieces) -> ActivationBatch:
        acts = {}
        for k in self.keys:
            # torch's gather and cast run on every core; numpy fancy indexing would run on one
            parts = [data[k].index_select(0, torch.from_numpy(idx)) for data, _, idx in pieces]
            acts[k] = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(self.dtype)
        rows = np.concatenate([tok[idx] for _, tok, idx in pieces])
        return ActivationBatch(acts=acts, rows=torch.from_numpy(rows))

    def _generate(self):
        first_epoch, skip = divmod(self.start_batch, self.batches_per_epoch)
        with ThreadPoolExecutor(1, thread_name_prefix="strata-check") as checker:
            for epoch in range(first_epoch, self.epochs):
                for pieces in self._epoch_batches(epoch, skip if epoch == first_epoch else 0, checker):
                    yield self._assemble(pieces)

    def __iter__(self):
        if self.prefetch <= 0:
            yield from self._generate()
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            """Hand `item` to the consumer; False once it has stopped (a full queue never blocks the worker)."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for batch in self._generate():
                    if not put(batch):
                        return
                put(None)
            except BaseException as e:  # surfaced in the consumer
                put(e)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the consumer stopped (or finished): no reader thread may outlive it, for one inside an h5py call
            stop.set()  # at interpreter exit would hold h5py's lock and hang the exit
            if not sys.is_finalizing():
                t.join()
