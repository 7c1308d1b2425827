"""The Strata dashboard (Streamlit): `strata dashboard RUN [--read-only]` runs this script.

The run directory comes from $STRATA_RUN (set by `strata dashboard`) or `-- --run RUN` after the script
name; read-only mode from $STRATA_READ_ONLY=1 or `--read-only`. The page, training run, SAE and feature
live in the URL's query string (?page=features&train=..&sae=..&f=..), so every view has a link.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from activations.errors import StrataError  # noqa: E402
from dashboard import data  # noqa: E402
from dashboard.render import CSS  # noqa: E402
from dashboard.views import circuits, features, flow, heads, overview, prompt  # noqa: E402
from dashboard.views.common import Ctx  # noqa: E402

PAGES = {"overview": ("Overview", overview.render), "features": ("Features", features.render),
         "flow": ("Flow", flow.render), "heads": ("Heads", heads.render),
         "prompt": ("Prompt explorer", prompt.render), "circuits": ("Circuits", circuits.render)}


def settings() -> tuple[str | None, bool]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--run")
    parser.add_argument("--read-only", action="store_true")
    args, _ = parser.parse_known_args(sys.argv[1:])
    run = args.run or os.environ.get("STRATA_RUN")
    read_only = args.read_only or os.environ.get("STRATA_READ_ONLY", "") in ("1", "true", "yes")
    return run, read_only


def main() -> None:
    st.set_page_config(page_title="Strata", layout="wide")
    st.html(f"<style>{CSS}</style>")
    run_arg, read_only = settings()
    if not run_arg:
        st.error("No run directory given: start the dashboard with `strata dashboard RUN`.")
        return
    try:
        run = data.check_run(run_arg)
    except StrataError as e:
        st.error(str(e))
        return

    qp = st.query_params
    if "page" not in st.session_state:
        asked = {"depth": "flow"}.get(qp.get("page"), qp.get("page"))  # ?page=depth: the Flow page's old name
        st.session_state.page = asked if asked in PAGES else "overview"
    st.sidebar.title("Strata")
    st.sidebar.caption(str(run))
    st.sidebar.radio("Page", list(PAGES), key="page", format_func=lambda p: PAGES[p][0])
    page = st.session_state.page
    if qp.get("page") != page:
        qp["page"] = page

    trains = data.index_names(run)
    if "train" not in st.session_state:
        st.session_state.train = data.checked_name(run, qp.get("train"), trains)
    if trains:
        if st.session_state.train not in trains:
            st.session_state.train = trains[0]
        st.sidebar.selectbox("Training run", trains, key="train")
    if read_only:
        st.sidebar.info("read-only: prompt explorer off")
    ctx = Ctx(run=run, read_only=read_only, train=st.session_state.get("train") if trains else None,
              trains=trains, query=qp)
    try:
        PAGES[page][1](ctx)
    except StrataError as e:
        st.error(str(e))


if __name__ == "__main__":  # `streamlit run dashboard/app.py`; `strata dashboard` runs strata/dashboard_script/
    main()
