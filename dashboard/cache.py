"""Streamlit caches: open index files and loaded weights once per server (cache_resource); small derived
tables once per index version (cache_data). Keys include the file's mtime, so a re-analysed run is reloaded."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from activations import layout
from dashboard.data import inside
from sae.analysis.index_file import FeatureIndex


def index_version(run, name: str) -> tuple[str, float]:
    path = inside(run, layout.index_path(run, name))
    return str(path), path.stat().st_mtime


@st.cache_resource(max_entries=8, show_spinner=False)
def _open_index(path: str, mtime: float) -> FeatureIndex:
    return FeatureIndex(path)


def open_index(run, name: str) -> FeatureIndex:
    return _open_index(*index_version(run, name))


@st.cache_data(max_entries=64, show_spinner=False)
def _column(path: str, mtime: float, sid: str, name: str):
    return _open_index(path, mtime).column(sid, name)


def column(run, name: str, sid: str, field: str):
    return _column(*index_version(run, name), sid, field)


@st.cache_data(max_entries=16, show_spinner=False)
def _feature_table(path: str, mtime: float, sid: str) -> pd.DataFrame:
    idx = _open_index(path, mtime)
    n = idx.n_latents(sid)
    df = pd.DataFrame({
        "feature": np.arange(n),
        "frequency": idx.column(sid, "frequency"),
        "mean_act": idx.column(sid, "mean_act"),
        "max_act": idx.column(sid, "max_act"),
    })
    expl = idx.column(sid, "explanation")
    if expl is not None:
        df["explanation"] = expl
        df["score"] = idx.column(sid, "explanation_score")
    if idx.has(sid, "mean_layer"):
        df["mean_layer"] = idx.column(sid, "mean_layer")
        df["n_layers"] = idx.column(sid, "n_layers_active")
    return df


def feature_table(run, name: str, sid: str) -> pd.DataFrame:
    return _feature_table(*index_version(run, name), sid)


@st.cache_data(max_entries=16, show_spinner=False)
def _peak_tokens(path: str, mtime: float, sid: str) -> np.ndarray:
    """Token id at the peak of each top example [n, k] (the window is centred on the peak)."""
    idx = _open_index(path, mtime)
    tokens = idx.column(sid, "top_tokens")
    return tokens[:, :, tokens.shape[2] // 2]


def features_firing_on(run, name: str, sid: str, text: str) -> np.ndarray:
    """Features whose top examples peak on a token equal to `text` (ignoring surrounding spaces and case)."""
    idx = open_index(run, name)
    peaks = _peak_tokens(*index_version(run, name), sid)
    want = text.strip().lower()
    if idx.vocab is None:
        ids = [int(want)] if want.isdigit() else []
    else:
        ids = [i for i, s in enumerate(idx.vocab) if s.strip().lower() == want]
    return np.nonzero(np.isin(peaks, ids).any(1))[0] if ids else np.zeros(0, dtype=int)


PROMPT_ROWS = 128  # tokens the prompt explorer runs at most


@st.cache_resource(max_entries=2, show_spinner="loading the model…")
def load_lm(model_id: str, precision: str = "fp32"):
    """(the model, the Precision it runs in): `precision` auto probes the model's matmul shapes on this machine
    (PROMPT_ROWS tokens, the prompt explorer's limit)."""
    from activations.model import forward_matmul_shapes, load_model, resolve_device
    from activations.precision import resolve

    device = resolve_device("auto")
    lm = load_model(model_id, device=device)
    prec = resolve(precision, device, forward_matmul_shapes(lm, PROMPT_ROWS))
    if prec.name != "fp32":
        lm.model.to(prec.dtype)
    return lm, prec


@st.cache_resource(max_entries=4, show_spinner="loading SAEs…")
def load_run_saes(run: str, name: str, mtime: float):
    from sae.checkpoint import load_saes

    return {sid: s.eval() for sid, s in load_saes(run, name).items()}


@st.cache_data(max_entries=8, show_spinner=False)
def _flow_links(path: str, mtime: float):
    from dashboard.flow_graph import all_links

    return all_links(_open_index(path, mtime))


def flow_links(run, name: str):
    """(every link between features of the index, whether they are causal matches): dashboard.flow_graph."""
    return _flow_links(*index_version(run, name))
