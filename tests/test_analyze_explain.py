"""Explainers: the offline default is deterministic and scored by detection F1; the OpenAI-compatible client
talks to a (local, fake) server, retries its rate limits, and when it gives up `strata analyze` has already
written the index, which `--explain-only` completes later; the transformers explainer runs a local model."""
from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import numpy as np
import pytest

from activations import layout
from sae.analysis.explain import ExplainerError, OpenAIExplainer, TokenExplainer, f1
from sae.analysis.index_file import FeatureIndex
from strata.cli import main


def windows(tokens_per_row):
    return np.array(tokens_per_row, dtype=np.int32)


def test_token_explainer_names_peak_tokens_and_detects_them():
    vocab = ["a", " the", " cat", " dog", "!"]
    top = windows([[0, 1, 2], [0, 1, 3], [4, 1, 2]])
    acts = np.array([[0, 5, 0], [0, 4, 0], [0, 0, 1.0]])
    e = TokenExplainer().explain(top, acts, vocab)
    assert e.text.startswith("fires on ' the' (90%)") and e.tokens == {1}
    pred = TokenExplainer().detect(e, windows([[1, 2, 3], [2, 3, 4], [-1, -1, 1]]), None, vocab)
    assert pred.tolist() == [True, False, True]
    assert f1(pred, np.array([True, False, False])) == pytest.approx(2 / 3)
    assert f1(np.zeros(3, bool), np.array([True, False, False])) == 0.0


class FakeChat(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions server. `script` says how to answer each request in turn: an HTTP
    status (429, 500: an error, with the Retry-After-ms header real servers send) or 200; past its end, 200."""

    prompts: ClassVar[list] = []
    script: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        FakeChat.prompts.append((self.path, self.headers.get("Authorization"), prompt))
        status = FakeChat.script.pop(0) if FakeChat.script else 200
        if status != 200:
            data = json.dumps({"error": {"message": "slow down" if status == 429 else "server error"}}).encode()
            self.send_response(status)
            self.send_header("Retry-After-ms", "5")
        else:
            answer = "the word cat" if "In one short phrase" in prompt else "1, 3"
            data = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def chat_server():
    """The fake server on 127.0.0.1; yields its base URL. Tests set FakeChat.script."""
    FakeChat.prompts, FakeChat.script = [], []
    server = HTTPServer(("127.0.0.1", 0), FakeChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_openai_compatible_endpoint(monkeypatch, chat_server):
    monkeypatch.setenv("STRATA_TEST_KEY", "sk-test")
    ex = OpenAIExplainer(chat_server, "local-model", api_key_env="STRATA_TEST_KEY")
    vocab = ["a", " cat", " dog"]
    e = ex.explain(windows([[0, 1, 2]]), np.array([[0, 3.0, 0]]), vocab)
    assert e.text == "the word cat"
    path, auth, prompt = FakeChat.prompts[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and "a<< cat>> dog" in prompt
    assert ex.detect(e, windows([[1], [2], [1]]), None, vocab).tolist() == [True, False, True]


def test_rate_limits_are_retried(chat_server):
    FakeChat.script = [429, 429]
    ex = OpenAIExplainer(chat_server, "local-model", max_retries=2)
    assert ex.explain(windows([[0, 1]]), np.array([[0, 1.0]]), ["a", " cat"]).text == "the word cat"
    assert len(FakeChat.prompts) == 3, "two 429 answers, then the retry that succeeded"
    FakeChat.script = [429, 429, 429]
    with pytest.raises(ExplainerError, match="failed after 2 retries .*RateLimitError"):
        ex.explain(windows([[0, 1]]), np.array([[0, 1.0]]), ["a", " cat"])


def test_unreachable_endpoint_is_a_one_line_error():
    ex = OpenAIExplainer("http://127.0.0.1:9/v1", "m", timeout=2, max_retries=1)
    with pytest.raises(ExplainerError, match="explainer endpoint .* failed after 1 retries"):
        ex.explain(windows([[0]]), np.array([[1.0]]), ["x"])


# ---------------------------------------------------------------- strata analyze with a remote explainer
STATISTICS = ("count", "max_act", "mean_act", "top_row", "top_tokens", "sample_row", "logit_top_ids", "neighbour_idx")


@pytest.fixture
def run_copy(analyzed_run, tmp_path):
    """A private copy of the analysed tiny run (a per-layer TopK bank 'topk-layer' with its index)."""
    run = tmp_path / "run"
    shutil.copytree(analyzed_run, run, ignore=shutil.ignore_patterns("share", ".locks", ".strata.lock"))
    return run


def columns(run, name="topk-layer") -> dict:
    idx = FeatureIndex(layout.index_path(run, name))
    try:
        return {(sid, c): idx.column(sid, c) for sid in idx.sae_ids for c in STATISTICS + ("explanation",
                                                                                             "explanation_score")}
    finally:
        idx.close()


def analyze_openai(run, url, *extra):
    return main(["analyze", str(run), "--name", "topk-layer", "--explainer", "openai", "--explainer-url", url,
                 "--explain-max", "2", "--progress", "false", "--device", "cpu", *extra])


def assert_same_statistics(a: dict, b: dict):
    for key, value in a.items():
        if key[1] in STATISTICS:
            np.testing.assert_array_equal(value, b[key], err_msg=str(key))


def test_analyze_rides_out_rate_limits(run_copy, chat_server, capsys):
    before = columns(run_copy)
    FakeChat.script = [429, 429]
    assert analyze_openai(run_copy, chat_server) == 0
    after = columns(run_copy)
    assert_same_statistics(before, after)
    idx = FeatureIndex(layout.index_path(run_copy, "topk-layer"))
    assert idx.meta["explainer"] == "openai"
    for sid in idx.sae_ids:
        expl = after[(sid, "explanation")]
        fired = after[(sid, "count")][:2] > 0
        assert [e == "the word cat" for e in expl[:2]] == fired.tolist(), "the first two features come from the server"
        assert all(e.startswith("fires on") or e == "(never fires)" or e == "" for e in expl[2:])
        assert idx.explained(sid) == {"explainer": "openai", "features": 2}
    idx.close()


def test_dead_explainer_leaves_a_complete_index_and_explain_only_finishes_it(run_copy, chat_server, capsys):
    before = columns(run_copy)
    index = layout.index_path(run_copy, "topk-layer")
    index.unlink()  # a fresh analysis: no earlier index to fall back on
    FakeChat.script = [500] * 1000
    assert analyze_openai(run_copy, chat_server) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("strata: error: explainer endpoint"), err
    assert f"{index} is written with every statistic" in err[0]
    assert f"strata analyze {run_copy} --name topk-layer --explain-only --explainer openai" in err[0]
    written = columns(run_copy)
    assert_same_statistics(before, written)  # the whole pass is in the index, with the offline explanations
    for sid in {k[0] for k in written}:  # --explain-max 2: the offline explanations of the first two features
        assert list(written[(sid, "explanation")][:2]) == list(before[(sid, "explanation")][:2])
        assert all(e.startswith("fires on") or e == "(never fires)" for e in written[(sid, "explanation")][:2])

    # the server is back: --explain-only asks it only for explanations and leaves every statistic as it was
    FakeChat.script, FakeChat.prompts = [], []
    assert analyze_openai(run_copy, chat_server, "--explain-only") == 0
    done = columns(run_copy)
    assert_same_statistics(before, done)
    sids = sorted({k[0] for k in done})
    for sid in sids:
        fired = done[(sid, "count")][:2] > 0
        assert [e == "the word cat" for e in done[(sid, "explanation")][:2]] == fired.tolist()
    assert len(FakeChat.prompts) <= 2 * 2 * len(sids), "explain + detect for at most 2 features per SAE"
    idx = FeatureIndex(index)
    assert idx.meta["explainer"] == "openai" and idx.negatives(idx.sae_ids[0])[0].shape[0] > 0
    idx.close()


def test_explain_only_continues_where_the_explainer_stopped(run_copy, chat_server, capsys):
    FakeChat.script = [200, 200, 200] + [500] * 1000  # feature 0 of the first SAE (2 calls), then dies
    assert analyze_openai(run_copy, chat_server) == 2
    capsys.readouterr()
    idx = FeatureIndex(layout.index_path(run_copy, "topk-layer"))
    first = idx.sae_ids[0]
    assert idx.explained(first) == {"explainer": "openai", "features": 1}, "the finished feature was saved"
    assert idx.meta["explainer"].startswith("openai (1 of ")
    idx.close()
    FakeChat.script, FakeChat.prompts = [], []
    assert analyze_openai(run_copy, chat_server, "--explain-only") == 0
    idx = FeatureIndex(layout.index_path(run_copy, "topk-layer"))
    assert all(idx.explained(sid) == {"explainer": "openai", "features": 2} for sid in idx.sae_ids)
    idx.close()
    asked = [p for _, _, p in FakeChat.prompts if "In one short phrase" in p]
    assert len(asked) <= 2 * 4 - 1, "feature 0 of the first SAE was not asked again"


def test_explain_only_needs_an_index(run_copy, capsys):
    shutil.rmtree(run_copy / "index")
    assert main(["analyze", str(run_copy), "--name", "topk-layer", "--explain-only", "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no index for 'topk-layer'" in err and not (run_copy / "index").exists()


def test_transformers_explainer_runs_a_local_model(tiny_llama):
    from sae.analysis.explain import TransformersExplainer

    ex = TransformersExplainer(str(tiny_llama), device="cpu", max_new_tokens=4)
    e = ex.explain(windows([[5, 6, 7]]), np.array([[0, 1.0, 0]]), None)
    assert isinstance(e.text, str) and e.text
    assert ex.detect(e, windows([[5], [6]]), None, None).dtype == bool
