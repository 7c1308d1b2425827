"""`strata share`: a static bundle that opens in a browser with no Python and no network, with hostile corpus
text kept as text."""
from __future__ import annotations

import re

import pytest

from strata.cli import main
from test_dashboard_pages import assert_no_active_markup
from test_dashboard_support import XSS_PAYLOADS, chromium_path, chromium_render, synthetic_run


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    vocab = [f"tok{i}" for i in range(10)] + XSS_PAYLOADS
    run = synthetic_run(tmp_path_factory.mktemp("share") / "run", vocab)
    assert main(["share", str(run), "--features", "resid.0:0-31;multi:0,1;cross:2;resid.1:4"]) == 0
    return run


def test_bundle_layout_and_no_network(shared):
    out = shared / "share"
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html"))
    assert "index.html" in pages and "resid.0/31.html" in pages and "multi/1.html" in pages
    assert len(pages) == 1 + 32 + 2 + 1 + 1
    for p in out.rglob("*.html"):
        text = p.read_text()
        srcs = re.findall(r'<script[^>]*src="([^"]*)"', text)
        assert srcs and all(s.endswith("assets/plotly.min.js") and "//" not in s for s in srcs), (p, srcs)
        assert "cdn." not in text.lower()
        assert_no_active_markup(re.sub(r"<script.*?</script>", "", text, flags=re.S))
    assert (out / "assets" / "plotly.min.js").stat().st_size > 1_000_000  # the real library, inlined locally
    # links between shared pages are relative, and only to pages that exist
    index = (out / "index.html").read_text()
    for href in re.findall(r"href='([^']+)'", index):
        assert (out / href).is_file(), href


def test_bad_feature_spec_is_a_one_line_error(shared, capsys):
    assert main(["share", str(shared), "--features", "nope:1"]) == 2
    assert "no SAE 'nope'" in capsys.readouterr().err
    assert main(["share", str(shared), "--features", "1-x"]) == 2


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_static_pages_open_in_headless_chromium(shared):
    page = shared / "share" / "resid.0" / "0.html"
    html, title = chromium_render(page.as_uri(), "document.querySelectorAll('.js-plotly-plot .main-svg').length "
                                                 "&& document.title", timeout=60)
    assert title and title.startswith("resid.0 #0"), title  # no payload rewrote the title
    assert html.count('class="tok') > 5
    assert "js-plotly-plot" in html  # plotly ran from the bundled file


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_payload_pages_stay_inert_in_chromium(shared):
    from sae.analysis.index_file import FeatureIndex

    import json

    idx = FeatureIndex(shared / "index" / "synth.h5")
    hostile = [f for f in range(32) if (idx.feature("resid.0", f)["top_tokens"] >= 10).any()]
    assert hostile
    tokens = idx.feature("resid.0", hostile[0])["top_tokens"]
    payload = XSS_PAYLOADS[int(tokens[tokens >= 10][0]) - 10]
    js = ("JSON.stringify({title: document.title, active: document.querySelectorAll('.strata-ctx img, .strata-ctx svg, "
          f".strata-ctx script, .strata-ctx b').length, text: document.body.innerText.includes({json.dumps(payload)})}})")
    html, value = chromium_render((shared / "share" / "resid.0" / f"{hostile[0]}.html").as_uri(), js, timeout=60)
    state = json.loads(value)
    assert not state["title"].startswith("pwned"), state
    assert state["active"] == 0
    assert state["text"], payload  # the payload is shown as visible text
