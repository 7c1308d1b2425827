"""The dashboard served by `streamlit run` (as `strata dashboard` does), opened in headless Chromium."""
from __future__ import annotations

import json
import socket

import pytest

from test_dashboard_support import XSS_PAYLOADS, chromium_path, chromium_render, synthetic_run

pytestmark = pytest.mark.skipif(chromium_path() is None,
                                reason="Debian's chromium is not installed (scripts/setup.sh installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from dashboard.serve import serve_dashboard, wait_until_up

    vocab = [f"word{i}" for i in range(30)] + XSS_PAYLOADS
    run = synthetic_run(tmp_path_factory.mktemp("browser") / "run", vocab)
    port = free_port()
    proc = serve_dashboard(run, read_only=True, port=port, host="127.0.0.1", block=False)
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}", timeout=90), "streamlit did not come up"
        yield run, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_feature_page_shows_highlighted_tokens(served):
    run, url = served
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(run / "index" / "synth.h5")
    f = int(idx.column("resid.1", "max_act").argmax())
    rec = idx.feature("resid.1", f)
    js = ("(() => { const t = [...document.querySelectorAll('.strata-ctx .tok')]; if (!t.length) return null;"
          " return JSON.stringify({n: t.length, peaks: document.querySelectorAll('.strata-ctx .tok.peak').length,"
          " titles: t.map(e => e.title).filter(x => x.startsWith('activation ')).length,"
          " shaded: t.filter(e => (e.style.background || '').includes('rgba(249, 115, 22')).length,"
          " head: document.body.innerText.includes('resid.1 · feature " + str(f) + "'),"
          " doc: document.title}); })()")
    _, value = chromium_render(f"{url}/?page=features&train=synth&sae=resid.1&f={f}", js, timeout=90)
    assert value, "the feature page never rendered its contexts"
    state = json.loads(value)
    n_top = int((rec["top_row"] >= 0).sum())
    assert state["head"]
    assert state["peaks"] >= n_top  # one peak per top example (and per interval sample)
    assert state["titles"] == state["n"]  # every token has its value on hover
    assert state["shaded"] >= state["peaks"]  # tokens where the feature fires are shaded (zero-activation ones are clear)
    assert not state["doc"].startswith("pwned")


def test_hostile_tokens_render_as_text_in_the_live_app(served):
    run, url = served
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(run / "index" / "synth.h5")
    f = next(f for f in range(32) if (idx.feature("resid.0", f)["top_tokens"] >= 30).any())
    js = ("(() => { if (!document.querySelectorAll('.strata-ctx .tok').length) return null;"
          " return JSON.stringify({active: document.querySelectorAll('.strata-ctx img, .strata-ctx svg, .strata-ctx script,"
          " .strata-ctx b, .strata-ctx a').length, doc: document.title,"
          " shown: document.body.innerText.includes('onerror')}); })()")
    _, value = chromium_render(f"{url}/?page=features&train=synth&sae=resid.0&f={f}", js, timeout=90)
    state = json.loads(value)
    assert state["active"] == 0 and not state["doc"].startswith("pwned")


def test_real_run_feature_page_in_chromium(analyzed_run):
    """The README's flow: `strata dashboard RUN` on an analysed run, the feature page opened in a browser."""
    from dashboard.serve import serve_dashboard, wait_until_up
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(analyzed_run / "index" / "topk-layer.h5")
    f = int(idx.column("resid.2", "count").argmax())
    port = free_port()
    proc = serve_dashboard(analyzed_run, port=port, host="127.0.0.1", block=False)
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}", timeout=90)
        js = ("(() => { const t = document.querySelectorAll('.strata-ctx .tok'); if (!t.length) return null;"
              " return JSON.stringify({n: t.length, peak: document.querySelectorAll('.strata-ctx .tok.peak').length,"
              " hover: [...t].every(e => e.title.startsWith('activation '))}); })()")
        _, value = chromium_render(f"http://127.0.0.1:{port}/?page=features&train=topk-layer&sae=resid.2&f={f}", js)
        state = json.loads(value)
        assert state["n"] > 20 and state["peak"] >= 1 and state["hover"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
