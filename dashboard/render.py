"""HTML for token contexts and small feature summaries, shared by the Streamlit pages and the static bundle.

All text that comes from the corpus or the model (token strings, explanations) passes through `esc`
(html.escape with quotes) before it is placed in HTML; nothing else builds HTML from such text.
"""
from __future__ import annotations

import html

import numpy as np

CSS = """
.strata-ctx { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; line-height: 1.9;
              white-space: pre-wrap; margin: 2px 0; }
.strata-ctx .tok { border-radius: 3px; padding: 1px 0; }
.strata-ctx .tok.peak { outline: 1px solid #c2410c; font-weight: 600; }
.strata-ctx .val { color: #888; font-size: 11px; margin-left: 8px; }
table.strata-grid { border-collapse: collapse; font-family: ui-monospace, Menlo, monospace; font-size: 12px; }
table.strata-grid td, table.strata-grid th { border: 1px solid #ddd; padding: 2px 5px; text-align: center; }
table.strata-grid a { text-decoration: none; }
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def show_token(s: str) -> str:
    """Make whitespace-only and control tokens visible, then escape."""
    s = s.replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "")
    return esc(s if s else "\u2205")


def token_span(text: str, value: float, max_value: float, peak: bool = False) -> str:
    alpha = 0.0 if max_value <= 0 else min(1.0, max(0.0, float(value) / max_value))
    style = f"background: rgba(249, 115, 22, {alpha:.3f})"
    cls = "tok peak" if peak else "tok"
    return (f'<span class="{cls}" data-act="{float(value):.4g}" title="activation {float(value):.4g}" '
            f'style="{style}">{show_token(text)}</span>')


def context_html(tokens: np.ndarray, acts: np.ndarray, token_str, max_value: float | None = None,
                 label: str = "") -> str:
    """One example window: every token shaded by the feature's activation there, value on hover."""
    tokens, acts = np.asarray(tokens), np.asarray(acts, dtype=np.float64)
    valid = tokens >= 0
    if not valid.any():
        return ""
    peak = int(np.argmax(np.where(valid, acts, -np.inf)))
    m = max_value if max_value else float(acts[valid].max())
    spans = "".join(token_span(token_str(int(t)), a, m, i == peak) for i, (t, a) in enumerate(zip(tokens, acts)) if t >= 0)
    val = f'<span class="val">{esc(label)}</span>' if label else ""
    return f'<div class="strata-ctx">{spans}{val}</div>'


def contexts_html(tokens: np.ndarray, acts: np.ndarray, labels: list[str], token_str, max_value: float) -> str:
    rows = [context_html(t, a, token_str, max_value, lab) for t, a, lab in zip(tokens, acts, labels)]
    return "".join(r for r in rows if r)


def token_list_html(ids, vals, token_str) -> str:
    items = "".join(f"<tr><td><code>{show_token(token_str(int(t)))}</code></td><td>{float(v):+.3f}</td></tr>"
                    for t, v in zip(ids, vals))
    return f'<table class="strata-grid">{items}</table>'


def feature_href(train: str, sid: str, f: int) -> str:
    from urllib.parse import urlencode

    return "?" + urlencode({"page": "features", "train": train, "sae": sid, "f": int(f)})


def feature_link(train: str, sid: str, f: int, text: str | None = None) -> str:
    """An in-app link to a feature page (same tab); `text` is escaped."""
    label = esc(text if text is not None else f"{sid} #{f}")
    return f'<a href="{esc(feature_href(train, sid, f))}" target="_self">{label}</a>'
