"""`strata share`: a static bundle that opens in a browser with no Python and no network, with hostile corpus
text kept as text, written only where Strata may write."""
from __future__ import annotations

import re

import pytest
from markupsafe import escape
from test_dashboard_pages import assert_no_active_markup
from test_dashboard_support import (
    XSS_PAYLOADS,
    chromium_launch_args,
    needs_chromium,
    synthetic_run,
)

from strata.cli import main

SPEC = "resid.0:0-31;multi:0,1;cross:2;resid.1:4"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return chromium_launch_args(browser_type_launch_args)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    vocab = [f"tok{i}" for i in range(10)] + XSS_PAYLOADS
    run = synthetic_run(tmp_path_factory.mktemp("share") / "run", vocab)
    assert main(["share", str(run), "--features", SPEC]) == 0
    return run


def pages(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.html"))


RUN_PAGES = "train/synth/"  # one training run, "synth": its pages are under train/synth/


def test_bundle_layout_and_no_network(shared):
    out = shared / "share"
    assert {"index.html", RUN_PAGES + "index.html", RUN_PAGES + "resid.0/31.html", RUN_PAGES + "multi/1.html"} \
        <= set(pages(out))
    assert len(pages(out)) == 2 + 32 + 2 + 1 + 1
    for p in out.rglob("*.html"):
        text = p.read_text()
        srcs = re.findall(r'<script[^>]*src="([^"]*)"', text)
        assert srcs and all(s.endswith("assets/plotly.min.js") and "//" not in s for s in srcs), (p, srcs)
        assert "cdn." not in text.lower()
        assert_no_active_markup(re.sub(r"<script.*?</script>", "", text, flags=re.DOTALL))
    assert (out / "assets" / "plotly.min.js").stat().st_size > 1_000_000  # the real library, inlined locally
    # links between shared pages are relative, and only to pages that exist
    for page in ("index.html", RUN_PAGES + "index.html", RUN_PAGES + "resid.0/0.html"):
        hrefs = re.findall(r'href="([^"]+)"', (out / page).read_text())
        assert hrefs
        for href in hrefs:
            assert (out / page).parent.joinpath(href).resolve().is_file(), (page, href)


def test_payloads_in_the_bundle_are_text(shared):
    """Explanations and token strings carry the payloads; the templates escape them (autoescape)."""
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(shared / "index" / "synth.h5")
    index = (shared / "share" / RUN_PAGES / "index.html").read_text()
    expl = [str(e) for e in idx.column("resid.0", "explanation")]
    hostile = next(e for e in expl if "<" in e)
    assert escape(hostile) in index and hostile not in index
    f = next(f for f in range(32) if (idx.feature("resid.0", f)["top_tokens"] >= 10).any())
    page = (shared / "share" / RUN_PAGES / "resid.0" / f"{f}.html").read_text()
    tokens = idx.feature("resid.0", f)["top_tokens"]
    payload = XSS_PAYLOADS[int(tokens[tokens >= 10][0]) - 10]
    assert escape(payload) in page and payload not in page


def test_templates_escape_by_default():
    from dashboard.share import TEMPLATES

    assert TEMPLATES.autoescape is True
    out = TEMPLATES.get_template("index.html").render(
        css="", root="", home="../../index.html", run_name="<b>run</b>", train="t", tokens=1,
        model="<img src=x onerror=alert(1)>", residual_figure="<script>alert(1)</script>",
        selection="<script>alert(3)</script>",
        saes=[{"id": "<svg/onload=alert(1)>", "n_latents": 1,
               "rows": [{"feature": 0, "href": "x\" onclick=\"alert(1)", "frequency": 0.5, "max_act": 1.0,
                         "score": 0.5, "explanation": "</table><script>alert(2)</script>"}]}])
    assert_no_active_markup(out.split("</head>")[1])  # <head> holds only the plotly script tag
    out = TEMPLATES.get_template("runs.html").render(
        css="", root="", run_name="<b>run</b>", runs=[
            {"name": "<svg/onload=alert(1)>", "href": "x\" onclick=\"alert(1)", "model": "<b>m</b>", "tokens": 1,
             "explainer": "<script>alert(1)</script>", "selection": "<img src=x onerror=alert(1)>",
             "saes": [{"id": "</td><script>alert(2)</script>", "shared": 1, "n_latents": 2}]}])
    assert_no_active_markup(out.split("</head>")[1])


def test_bad_feature_specs_are_one_line_errors(shared, capsys):
    for spec, message in [("nope:1", "no SAE 'nope'"), ("1-x", "bad feature list"), ("999", "does not exist in"),
                          ("5-2", "runs backwards"), ("resid.0:", "no features listed for resid.0"),
                          ("", "--features is empty"), ("top:0", "top:N")]:
        before = pages(shared / "share")
        assert main(["share", str(shared), "--features", spec]) == 2, spec
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (spec, err)
        assert pages(shared / "share") == before  # the earlier bundle is untouched


def test_rerunning_share_replaces_its_own_bundle(shared, tmp_path):
    out = tmp_path / "bundle"
    assert main(["share", str(shared), "--features", "resid.0:1,2", "--out", str(out)]) == 0
    assert pages(out) == ["index.html", RUN_PAGES + "index.html", RUN_PAGES + "resid.0/1.html", RUN_PAGES + "resid.0/2.html"]
    assert main(["share", str(shared), "--features", "resid.1:7", "--out", str(out)]) == 0
    # the new bundle, whole; nothing of the old one
    assert pages(out) == ["index.html", RUN_PAGES + "index.html", RUN_PAGES + "resid.1/7.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .partial or .old left beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["share", str(shared), "--features", "resid.1:7", "--out", str(empty)]) == 0  # an empty folder is fine
    assert pages(empty) == ["index.html", RUN_PAGES + "index.html", RUN_PAGES + "resid.1/7.html"]


def test_share_into_a_users_folder_is_refused(shared, tmp_path, capsys):
    mine = tmp_path / "my-analysis"
    (mine / "figures").mkdir(parents=True)
    (mine / "notes.md").write_text("what feature 12 does\n")
    (mine / "figures" / "fig1.svg").write_text("<svg/>")
    assert main(["share", str(shared), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and str(mine) in err
    assert (mine / "notes.md").read_text() == "what feature 12 does\n" and (mine / "figures" / "fig1.svg").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-analysis"]  # and no .partial was created


def test_share_onto_a_file_is_refused(shared, tmp_path, capsys):
    target = tmp_path / "report.html"
    target.write_text("<p>my report</p>")
    assert main(["share", str(shared), "--out", str(target)]) == 2
    assert "existing file" in capsys.readouterr().err
    assert target.read_text() == "<p>my report</p>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no report.html.old, no .partial


def test_share_is_refused_while_a_harvest_holds_the_run(shared, capsys):
    from activations.lock import run_lock

    before = pages(shared / "share")
    with run_lock(shared, "strata harvest"):
        assert main(["share", str(shared), "--features", "resid.1:3"]) == 2
    assert "in use by `strata harvest`" in capsys.readouterr().err
    assert pages(shared / "share") == before
    # once the harvest is done, rerunning share replaces its own earlier bundle in RUN/share
    assert main(["share", str(shared), "--features", SPEC]) == 0
    assert pages(shared / "share") == before
    assert sorted(p.name for p in shared.iterdir() if p.name.startswith("share")) == ["share"]


# ---------------------------------------------------------------- every training run, interpretable features first
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A run with two analysed training runs, "second" and "synth"; synth's resid.0 holds planted features."""
    from test_dashboard_pages import PLANTED_VOCAB, plant_features

    run = tmp_path_factory.mktemp("share-two") / "run"
    synthetic_run(run, PLANTED_VOCAB, name="second")
    synthetic_run(run, PLANTED_VOCAB)
    return run, plant_features(run)


def test_share_takes_every_training_run_and_its_index_links_them(two_runs, capsys):
    run, _ = two_runs
    assert main(["share", str(run)]) == 0
    out = run / "share"
    assert capsys.readouterr().out.strip() == f"wrote {out / 'index.html'}"
    index = (out / "index.html").read_text()
    assert re.findall(r'href="([^"]+)"', index) == ["train/second/index.html", "train/synth/index.html"]
    for name in ("second", "synth"):
        run_page = (out / "train" / name / "index.html").read_text()
        assert re.findall(r'<p><a href="([^"]+)">← all training runs', run_page) == ["../../index.html"]
        links = re.findall(r'href="([^"]+\.html)"', run_page)
        assert len(links) > 5 * 25  # best:100 of every SAE: all but the few set aside
        assert all((out / "train" / name).joinpath(h).resolve().is_file() for h in links)
    for page in out.rglob("*.html"):  # every page, however deep, finds the one bundled plotly
        src = re.findall(r'<script[^>]*src="([^"]*)"', page.read_text())
        assert src and page.parent.joinpath(src[0]).resolve() == (out / "assets" / "plotly.min.js").resolve()


def test_default_selection_is_interpretable_features_first(two_runs, tmp_path):
    run, f = two_runs
    assert main(["share", str(run), "--features", "best:5", "--out", str(tmp_path / "b")]) == 0
    folder = tmp_path / "b" / "train" / "synth"
    assert len(list((folder / "resid.0").glob("*.html"))) == 5
    run_page = (folder / "index.html").read_text()
    resid0 = run_page.split("<h2>resid.0 ")[1].split("</table>")[0]
    listed = [int(x) for x in re.findall(r'>#(\d+)</a>', resid0)]
    assert listed[0] == f["good"]  # the planted interpretable feature leads, best first
    assert f["dense"] not in listed and f["outlier"] not in listed
    assert not (folder / "resid.0" / f"{f['outlier']}.html").exists()
    assert "left out: 1 always-on (density above 30%" in run_page and "1 outlier-only (max activation" in run_page
    # top:N is still the densest N: the always-on feature is the densest of resid.0
    assert main(["share", str(run), "--features", "top:1", "--name", "synth", "--out", str(tmp_path / "t")]) == 0
    densest = dense_first(run, "synth")
    assert densest["resid.0"] == f["dense"]
    assert pages(tmp_path / "t") == sorted(["index.html", "train/synth/index.html",
                                            *(f"train/synth/{sid}/{j}.html" for sid, j in densest.items())])


def dense_first(run, name: str) -> dict[str, int]:
    import numpy as np

    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(run / "index" / f"{name}.h5")
    return {sid: int(np.argmax(idx.column(sid, "frequency"))) for sid in idx.sae_ids}


def test_name_shares_one_training_run(two_runs, tmp_path, capsys):
    run, _ = two_runs
    assert main(["share", str(run), "--name", "second", "--features", "resid.1:2,3", "--out", str(tmp_path / "o")]) == 0
    assert pages(tmp_path / "o") == ["index.html", "train/second/index.html", "train/second/resid.1/2.html",
                                     "train/second/resid.1/3.html"]
    assert re.findall(r'href="([^"]+)"', (tmp_path / "o" / "index.html").read_text()) == ["train/second/index.html"]
    assert main(["share", str(run), "--name", "third", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["strata: error: no index for training run 'third'; choose one of second, synth (or leave out "
                   "--name to share every one)"]
    assert not (tmp_path / "x").exists()


@needs_chromium
def test_static_pages_open_in_headless_chromium(shared, page):
    page.goto((shared / "share" / RUN_PAGES / "resid.0" / "0.html").as_uri())
    page.locator(".js-plotly-plot .main-svg").first.wait_for()  # plotly ran from the bundled file
    assert page.title().startswith("resid.0 #0")  # no payload rewrote the title
    assert page.locator(".strata-ctx .tok").count() > 5
    page.get_by_text("← all features").click()
    page.wait_for_url("**/share/train/synth/index.html")
    assert page.locator("table.strata-grid a").count() == 32 + 2 + 1 + 1  # a link per shared feature
    page.get_by_text("← all training runs").click()
    page.wait_for_url("**/share/index.html")
    page.locator("table.strata-grid a", has_text="synth").click()  # the runs page links the run's page
    page.wait_for_url("**/share/train/synth/index.html")


@needs_chromium
def test_payload_pages_stay_inert_in_chromium(shared, page):
    from sae.analysis.index_file import FeatureIndex

    idx = FeatureIndex(shared / "index" / "synth.h5")
    hostile = [f for f in range(32) if (idx.feature("resid.0", f)["top_tokens"] >= 10).any()]
    tokens = idx.feature("resid.0", hostile[0])["top_tokens"]
    payload = XSS_PAYLOADS[int(tokens[tokens >= 10][0]) - 10]
    alerts = []
    page.on("dialog", lambda d: (alerts.append(d.message), d.dismiss()))
    page.goto((shared / "share" / RUN_PAGES / "resid.0" / f"{hostile[0]}.html").as_uri())
    contexts = page.locator(".strata-ctx")
    assert contexts.locator("img, svg, script, b, a").count() == 0
    assert payload in contexts.evaluate_all("cs => cs.map(c => c.innerText).join('\\n')")  # shown as text
    for tok in contexts.locator(".tok").filter(has_text="<").all()[:15]:
        tok.hover()  # the onmouseover payloads stay text
    page.goto((shared / "share" / RUN_PAGES / "index.html").as_uri())
    page.locator("table.strata-grid").first.wait_for()
    assert page.locator("table.strata-grid").locator("img, svg, script, b").count() == 0
    assert alerts == [] and not page.title().startswith("pwned")
