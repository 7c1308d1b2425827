"""A trainer streams shuffled batches; the dashboard reads rows by token index; neither ever returns damaged data."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_harvest_safety import flip_chunk_byte

from activations.errors import StrataError
from activations.manifest import file_sha256, load_manifest, save_manifest
from activations.reader import ActivationReader, open_run


def test_each_token_once_per_epoch_in_a_seeded_order(tiny_run):
    run = open_run(tiny_run)
    reader = ActivationReader(run, ["resid.1", "mlp_out.2"], batch_size=500, epochs=2, seed=3,
                              block_rows=256, buffer_bytes=200_000)
    batches = list(reader)
    assert len(batches) == len(reader) == 2 * 13
    per_epoch = reader.batches_per_epoch
    for e in range(2):
        rows = torch.cat([b.rows for b in batches[e * per_epoch:(e + 1) * per_epoch]]).numpy()
        assert sorted(rows.tolist()) == list(range(run.n_tokens)), "every token exactly once"
        assert not np.array_equal(rows, np.arange(run.n_tokens)), "shuffled"
    e0 = torch.cat([b.rows for b in batches[:per_epoch]])
    e1 = torch.cat([b.rows for b in batches[per_epoch:]])
    assert not torch.equal(e0, e1), "each epoch has its own order"
    again = torch.cat([b.rows for b in ActivationReader(run, ["resid.1", "mlp_out.2"], 500, epochs=2, seed=3, block_rows=256,
                                                         buffer_bytes=200_000)])
    assert torch.equal(again, torch.cat([e0, e1])), "same seed, same order"


def test_a_consumer_that_stops_early_leaves_no_reader_thread_behind(tiny_run):
    """Training that stops after a few batches (a max-tokens budget, an error) closes the reader: its prefetch
    thread has ended when the loop has, even with its queue full, so none can hang the process's exit inside h5py."""
    import threading
    import time

    run = open_run(tiny_run)
    before = set(threading.enumerate())
    batches = iter(ActivationReader(run, ["resid.1"], 64, epochs=3, seed=0, prefetch=1))
    next(batches)
    time.sleep(0.5)  # the worker has read ahead and waits on the full queue
    batches.close()
    assert set(threading.enumerate()) <= before, "the prefetch thread ended with the consumer"


def test_batches_hold_the_same_tokens_for_every_key(tiny_run):
    run = open_run(tiny_run)
    batch = next(iter(ActivationReader(run, ["resid.1", "mlp_out.2"], 64, seed=0)))
    for key in ("resid.1", "mlp_out.2"):
        np.testing.assert_array_equal(batch.acts[key].numpy(), run.read_rows(key, batch.rows.numpy()))


def test_resume_from_batch_n_continues_the_same_stream(tiny_run):
    kw = dict(batch_size=384, epochs=3, seed=1, block_rows=256, buffer_bytes=100_000)
    full = [b.rows for b in ActivationReader(tiny_run, ["resid.2"], **kw)]
    rest = [b.rows for b in ActivationReader(tiny_run, ["resid.2"], start_batch=21, **kw)]
    assert len(rest) == len(full) - 21 and all(torch.equal(a, b) for a, b in zip(full[21:], rest))


def test_sequential_reading_and_shard_subsets(tiny_run):
    run = open_run(tiny_run)
    train, held = run.split(0.2)
    assert train == [0, 1, 2, 3, 4] and held == [5]
    rows = torch.cat([b.rows for b in ActivationReader(run, "resid.0", 100, shards=held, shuffle=False)])
    assert rows.tolist() == list(range(5 * 1024, 6 * 1024))


def test_random_access_matches_streaming(tiny_run):
    run = open_run(tiny_run)
    idx = np.array([6000, 5, 1030, 5, 3000])
    got = run.read_rows("mlp_in.1", idx)
    assert got.shape == (5, 32) and np.array_equal(got[1], got[3])
    seq = torch.cat([b.acts["mlp_in.1"] for b in ActivationReader(run, "mlp_in.1", 1024, shuffle=False)]).numpy()
    np.testing.assert_array_equal(got, seq[idx])


def test_bad_reader_requests(tiny_run):
    run = open_run(tiny_run)
    with pytest.raises(StrataError, match="no activations for resid.9"):
        ActivationReader(run, ["resid.9"], 10)
    with pytest.raises(StrataError, match="batch size"):
        ActivationReader(run, ["resid.1"], 0)
    with pytest.raises(StrataError, match="out of range"):
        run.read_rows("resid.1", [10**9])


def test_exclude_first_positions_of_every_context(tiny_run):
    """Attention-sink tokens (position 0, norms ~100x the rest in SmolLM2) can be left out of training data."""
    run = open_run(tiny_run)
    ctx = run.manifest.context_length
    reader = ActivationReader(run, ["resid.1"], 100, seed=2, exclude_first=1, block_rows=256, buffer_bytes=50_000)
    rows = torch.cat([b.rows for b in reader]).numpy()
    assert reader.n_rows == run.n_tokens - run.n_tokens // ctx
    assert sorted(rows.tolist()) == [r for r in range(run.n_tokens) if r % ctx != 0]
    rest = torch.cat([b.rows for b in ActivationReader(run, ["resid.1"], 100, seed=2, exclude_first=1, block_rows=256,
                                                        buffer_bytes=50_000, start_batch=17)]).numpy()
    np.testing.assert_array_equal(rest, rows[1700:])


@pytest.fixture
def own_run(tmp_path, tiny_run):
    """A private copy of the shared tiny run, to damage."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("train", "index", "share", ".locks", ".strata.lock"))
    return dest


def test_a_damaged_chunk_is_an_error_naming_the_file_never_wrong_numbers(own_run):
    flip_chunk_byte(own_run / "acts/resid.1/shard-00002.h5")
    flip_chunk_byte(own_run / "tokens/shard-00004.h5", "token_ids")
    run = open_run(own_run)
    with pytest.raises(StrataError, match=r"acts/resid.1/shard-00002.h5 is damaged .*strata harvest .*--resume"):
        list(ActivationReader(run, ["resid.1"], 256, seed=0))
    with pytest.raises(StrataError, match="resid.1/shard-00002.h5"):
        run.read_rows("resid.1", [2 * 1024 + 5])
    assert run.read_rows("resid.1", [5, 3 * 1024]).shape == (2, 32), "undamaged shards still read"
    assert len(list(ActivationReader(run, ["resid.2"], 256, seed=0))) == 24, "other keys still read"
    with pytest.raises(StrataError, match="tokens/shard-00004.h5 is damaged"):
        run.read_tokens(4 * 1024, 4 * 1024 + 10)


def _strip_checksums(path: Path) -> None:
    """Rewrite an activation shard as older harvests wrote it: the rows only, no chunk hashes."""
    with h5py.File(path, "r") as f:
        data, attrs = f["acts"][:], dict(f["acts"].attrs)
    path.unlink()
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset("acts", data=data, chunks=(len(data), data.shape[1]), track_times=False)
        ds.attrs.update(attrs)


def test_shards_written_without_checksums_are_checked_against_the_manifest(own_run):
    expected = open_run(own_run).read_rows("resid.1", [1024 + 7])
    shard = own_run / "acts/resid.1/shard-00001.h5"
    _strip_checksums(shard)
    m = load_manifest(own_run)
    m.shards[1].files["resid.1"]["sha256"] = file_sha256(shard)
    save_manifest(own_run, m)
    np.testing.assert_array_equal(open_run(own_run).read_rows("resid.1", [1024 + 7]), expected)
    flip_chunk_byte(shard)
    with pytest.raises(StrataError, match="shard-00001.h5 is damaged \\(its sha256 differs"):
        open_run(own_run).read_rows("resid.1", [1024 + 7])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_shard_writer_chunks_blocks_of_any_size_and_their_sums_verify(tmp_path, dtype):
    """The shard writer writes whole chunks as blocks arrive (blocks that do not line up with chunks, a short last
    chunk, more or fewer rows than planned): the file reads back the rows appended, and every chunk's stored xxh3
    matches its rows, as the reader checks them."""
    from activations.shards import ACTS, CHUNK_SUMS, ActivationShardWriter, rows_hash, to_storage

    rng = np.random.default_rng(0)
    for sizes, planned in (([1024] * 4, 4096), ([100, 300, 57, 700], 1157), ([100, 300], 4096), ([500] * 3, 1000)):
        path = tmp_path / f"{dtype}-{planned}-{len(sizes)}.h5"
        writer = ActivationShardWriter(path, 48, dtype, planned)
        blocks = [to_storage(torch.from_numpy(rng.standard_normal((n, 48)).astype(np.float32)), dtype) for n in sizes]
        for block in blocks:
            writer.append(block)
        writer.close()
        with h5py.File(path, "r") as f:
            rows, step = f[ACTS][:], f[ACTS].chunks[0]
            assert np.array_equal(rows, np.concatenate(blocks)), sizes
            assert list(f[CHUNK_SUMS][:]) == [rows_hash(rows[a:a + step]) for a in range(0, len(rows), step)], sizes
