"""Pack documents into fixed-length contexts, keeping for every token its document and position.

Documents are tokenized without special tokens and joined into one stream, each followed by EOS. Models
whose tokenizer adds a BOS token by default get BOS at the start of every context (doc_id -1, position -1);
others get none. A `CorpusPosition` (document index, token offset inside it) after each context lets a
resumed harvest continue exactly where the last complete shard ended.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CorpusPosition:
    doc: int = 0
    offset: int = 0


@dataclass
class Context:
    token_ids: np.ndarray  # int32 [context]
    doc_ids: np.ndarray  # int64 [context]
    positions: np.ndarray  # int32 [context]
    end: CorpusPosition  # where the next context starts


def decode_each(tokenizer, ids) -> list[str]:
    """Each token id decoded on its own, spaces kept as the tokenizer writes them (range(len(tokenizer)): the
    whole vocabulary)."""
    return tokenizer.batch_decode([[int(i)] for i in ids], clean_up_tokenization_spaces=False)


def wants_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def pack_contexts(docs: Iterator[str], tokenizer, context: int, start: CorpusPosition = CorpusPosition()) -> Iterator[Context]:
    """`docs` must yield documents from index `start.doc` on."""
    bos = tokenizer.bos_token_id if wants_bos(tokenizer) else None
    eos = tokenizer.eos_token_id
    body = context - (1 if bos is not None else 0)
    buf_ids: list[int] = []
    buf_doc: list[int] = []
    buf_pos: list[int] = []
    ends: list[CorpusPosition] = []  # corpus position after each buffered token
    for i, text in enumerate(docs):
        d = start.doc + i
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if eos is not None:
            ids = list(ids) + [eos]
        first = start.offset if i == 0 else 0
        n = len(ids)
        for p in range(first, n):
            buf_ids.append(ids[p])
            buf_doc.append(d)
            buf_pos.append(p)
            ends.append(CorpusPosition(d, p + 1) if p + 1 < n else CorpusPosition(d + 1, 0))
        while len(buf_ids) >= body:
            tid = np.asarray(buf_ids[:body], dtype=np.int32)
            did = np.asarray(buf_doc[:body], dtype=np.int64)
            pos = np.asarray(buf_pos[:body], dtype=np.int32)
            end = ends[body - 1]
            if bos is not None:
                tid = np.concatenate([[bos], tid]).astype(np.int32)
                did = np.concatenate([[-1], did]).astype(np.int64)
                pos = np.concatenate([[-1], pos]).astype(np.int32)
            del buf_ids[:body], buf_doc[:body], buf_pos[:body], ends[:body]
            yield Context(tid, did, pos, end)
    # A final partial context is dropped: every context is full length.
