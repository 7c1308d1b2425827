"""Explainers: the offline default is deterministic and scored by detection F1; the OpenAI-compatible client
talks to a (local, fake) server; the transformers explainer runs a local model."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from sae.analysis.explain import OpenAIExplainer, TokenExplainer, f1


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
    prompts: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        FakeChat.prompts.append((self.path, self.headers.get("Authorization"), prompt))
        answer = "the word cat" if "In one short phrase" in prompt else "1, 3"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_openai_compatible_endpoint(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), FakeChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STRATA_TEST_KEY", "sk-test")
        ex = OpenAIExplainer(f"http://127.0.0.1:{server.server_port}/v1", "local-model", api_key_env="STRATA_TEST_KEY")
        vocab = ["a", " cat", " dog"]
        e = ex.explain(windows([[0, 1, 2]]), np.array([[0, 3.0, 0]]), vocab)
        assert e.text == "the word cat"
        path, auth, prompt = FakeChat.prompts[-1]
        assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and "a<< cat>> dog" in prompt
        assert ex.detect(e, windows([[1], [2], [1]]), None, vocab).tolist() == [True, False, True]
    finally:
        server.shutdown()


def test_unreachable_endpoint_is_a_one_line_error():
    from activations.errors import StrataError

    ex = OpenAIExplainer("http://127.0.0.1:9/v1", "m", timeout=2)
    with pytest.raises(StrataError, match="explainer endpoint .* failed"):
        ex.explain(windows([[0]]), np.array([[1.0]]), ["x"])


def test_transformers_explainer_runs_a_local_model(tiny_llama):
    from sae.analysis.explain import TransformersExplainer

    ex = TransformersExplainer(str(tiny_llama), device="cpu", max_new_tokens=4)
    e = ex.explain(windows([[5, 6, 7]]), np.array([[0, 1.0, 0]]), None)
    assert isinstance(e.text, str) and e.text
    assert ex.detect(e, windows([[5], [6]]), None, None).dtype == bool
