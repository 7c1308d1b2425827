"""Where the analysis pass gets its tokens: consecutive row ranges with a margin on each side.

Rows are read in order (not shuffled) so that a token's window is in the same block as the token;
the margin rows are encoded but not counted. `run_blocks` reads a harvested run through the reader API
(run.read_rows / run.read_tokens); `array_blocks` serves arrays already in memory (tests, benchmarks).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from sae.analysis.indexer import Block


def row_ranges(spans: list[tuple[int, int]], batch: int, max_rows: int = 0) -> Iterator[tuple[int, int]]:
    """Split [start, stop) spans into ranges of at most `batch` rows, stopping after `max_rows` (0 = all)."""
    left = max_rows or float("inf")
    for start, stop in spans:
        for s in range(start, stop, batch):
            if left <= 0:
                return
            e = int(min(stop, s + batch, s + left))
            left -= e - s
            yield s, e


def array_blocks(acts: dict, token_ids, doc_ids, context_ids, batch: int, margin: int, device,
                 spans: list[tuple[int, int]] | None = None, max_rows: int = 0) -> Iterator[Block]:
    """Blocks over in-memory arrays {key: [T, d]} (numpy or torch)."""
    T = len(token_ids)
    def as_t(a, dt=None):
        return torch.as_tensor(a, dtype=dt)
    token_ids, doc_ids, context_ids = as_t(token_ids, torch.int32), as_t(doc_ids, torch.long), as_t(context_ids, torch.long)
    for s, e in row_ranges(spans or [(0, T)], batch, max_rows):
        a, b = max(0, s - margin), min(T, e + margin)
        yield Block(start=a, core=(s - a, e - a),
                    acts={k: as_t(v[a:b]).to(device, torch.float32) for k, v in acts.items()},
                    token_ids=token_ids[a:b].to(device), doc_ids=doc_ids[a:b].to(device),
                    context_ids=context_ids[a:b].to(device))


def run_blocks(run, keys: list[str], spans: list[tuple[int, int]], batch: int, margin: int, device,
               max_rows: int = 0) -> Iterator[Block]:
    """Blocks read from a harvested run; a background thread reads the next block while this one is used."""
    from concurrent.futures import ThreadPoolExecutor

    T = run.n_tokens
    context = int(run.manifest.context_length) or T

    def read(s, e):
        a, b = max(0, s - margin), min(T, e + margin)
        rows = np.arange(a, b, dtype=np.int64)
        tok = run.read_tokens(a, b)
        acts = {k: torch.from_numpy(np.ascontiguousarray(run.read_rows(k, rows))) for k in keys}
        return a, (s - a, e - a), acts, tok

    ranges = list(row_ranges(spans, batch, max_rows))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, *ranges[0]) if ranges else None
        for i in range(len(ranges)):
            a, core, acts, tok = pending.result()
            if i + 1 < len(ranges):
                pending = pool.submit(read, *ranges[i + 1])
            rows = torch.arange(a, a + len(tok["token_ids"]))
            yield Block(start=a, core=core, acts={k: v.to(device, torch.float32) for k, v in acts.items()},
                        token_ids=torch.from_numpy(tok["token_ids"].astype(np.int32)).to(device),
                        doc_ids=torch.from_numpy(tok["doc_ids"].astype(np.int64)).to(device),
                        context_ids=(rows // context).to(device))
