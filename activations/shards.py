"""HDF5 shard files: one per (shard, key) for activations, one per shard for tokens.

Activations are rows [tokens, d], stored float16 by default; bfloat16 has no HDF5 type, so it is stored as
uint16 with the attribute dtype="bfloat16". Chunks span whole rows, ~256-512 KiB each, so a reader that
takes chunk-aligned blocks touches each chunk once. Datasets are written with track_times=False so the
same content gives byte-identical files (a resumed run equals an uninterrupted one).

Damaged data must fail to read rather than give wrong numbers, so training and analysis cannot silently use a
damaged shard. The files use HDF5's latest format, whose metadata is checksummed. Activation files also hold
"chunk_xxh3": the xxh3-64 hash of each chunk's rows, which readers check when they first read a chunk
(activations/reader.py). Hashing rows the reader has just read costs a few percent of its throughput, where
HDF5's fletcher32 filter would cost about a third (scripts/bench_harvest.py). Token files are small and use
fletcher32. `has_checksums` tells these files from older ones written without checksums, which readers check
against the manifest's sha256 instead.
"""
from __future__ import annotations

import h5py
import numpy as np
import torch
import xxhash

ACTS = "acts"
CHUNK_SUMS = "chunk_xxh3"  # uint64 [n_chunks]: xxh3-64 of the stored bytes of each chunk's rows
TOKEN_FIELDS = ("token_ids", "doc_ids", "positions")
CHUNK_BYTES = 1 << 19


def chunk_rows(d: int, itemsize: int = 2) -> int:
    rows = max(1, CHUNK_BYTES // (d * itemsize))
    return 1 << (rows.bit_length() - 1)  # a power of two


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """[rows, d] tensor -> numpy array in the storage dtype (on the tensor's device first, to halve the copy)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return x.to(torch.float16).cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows -> float32."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


class ActivationShardWriter:
    """Appends row blocks to one activation shard file (opened on a temporary path by the caller).

    Each full chunk is written as it completes, as raw bytes (HDF5's direct chunk write: the dataset has no filters),
    and hashed from memory for CHUNK_SUMS; rows short of a chunk wait in `pending`. So the file's bytes go out while
    the harvest's next forward runs, and close() only writes the last chunk and the metadata: through HDF5's chunk
    cache the whole file was written, then read back for its hashes, at close, on the harvest's critical path (the
    last shard's commit)."""

    def __init__(self, path, d: int, dtype: str, expected_rows: int):
        self.file = h5py.File(path, "w", libver="latest")
        np_dtype = np.uint16 if dtype == "bfloat16" else np.float16
        self.ds = self.file.create_dataset(ACTS, shape=(expected_rows, d), maxshape=(None, d), dtype=np_dtype,
                                           chunks=(min(chunk_rows(d), max(1, expected_rows)), d), track_times=False)
        self.ds.attrs["dtype"] = dtype
        self.step = self.ds.chunks[0]
        self.pending = np.empty((0, d), dtype=np_dtype)  # rows after the last written chunk
        self.sums: list[int] = []  # one per written chunk

    def _write_chunk(self, rows: np.ndarray) -> None:
        """Write the next chunk (rows: at most a chunk of them; a short one is zero-padded to the chunk's size, as HDF5
        stores edge chunks) and record the hash of its rows."""
        start = len(self.sums) * self.step
        if start + len(rows) > self.ds.shape[0]:
            self.ds.resize(start + len(rows), axis=0)
        self.sums.append(rows_hash(rows))
        if len(rows) < self.step:
            rows = np.concatenate([rows, np.zeros((self.step - len(rows), rows.shape[1]), rows.dtype)])
        self.ds.id.write_direct_chunk((start, 0), np.ascontiguousarray(rows))

    def append(self, block: np.ndarray) -> None:
        rows = np.concatenate([self.pending, block]) if len(self.pending) else block
        full = len(rows) // self.step * self.step
        for a in range(0, full, self.step):
            self._write_chunk(rows[a:a + self.step])
        self.pending = rows[full:].copy()

    def close(self) -> None:
        rows = len(self.sums) * self.step + len(self.pending)  # every row appended
        if len(self.pending):
            self._write_chunk(self.pending)
        if rows != self.ds.shape[0]:
            self.ds.resize(rows, axis=0)
        self.file.create_dataset(CHUNK_SUMS, data=np.array(self.sums, dtype=np.uint64), track_times=False)
        self.file.close()


def rows_hash(rows: np.ndarray) -> int:
    """xxh3-64 of a block of stored rows (C order), as kept per chunk in CHUNK_SUMS."""
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(rows).data)


def write_tokens(path, token_ids: np.ndarray, doc_ids: np.ndarray, positions: np.ndarray) -> None:
    with h5py.File(path, "w", libver="latest") as f:
        for name, arr in zip(TOKEN_FIELDS, (token_ids, doc_ids, positions)):
            f.create_dataset(name, data=arr, chunks=(min(len(arr), 1 << 16),), track_times=False, fletcher32=True)


def has_checksums(f: h5py.File) -> bool:
    """Whether an open shard file carries checksums readers check on read (older shards do not)."""
    if ACTS in f:
        return CHUNK_SUMS in f
    return all(name in f and f[name].fletcher32 for name in TOKEN_FIELDS)


def read_tokens(path, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][start:stop] for name in TOKEN_FIELDS}
