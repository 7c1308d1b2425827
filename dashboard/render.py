"""HTML for token contexts, links and small tables, shared by the Streamlit pages and the static bundle.

Every helper returns `markupsafe.Markup` built with a Markup template's `%` operator and `Markup.join`, which
escape each value that is not Markup already (`%` rather than `.format`: 3x faster on the hot token path): text
from the corpus or the model (token strings, explanations, typed prompts) is escaped by construction, never by a
call someone has to remember. views/common.html shows only Markup.
"""
from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
from markupsafe import Markup

CSS = Markup("""
.strata-ctx { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; line-height: 1.9;
              white-space: pre-wrap; margin: 2px 0; }
.strata-ctx .tok { border-radius: 3px; padding: 1px 0; }
.strata-ctx .tok.peak { outline: 1px solid #c2410c; font-weight: 600; }
.strata-ctx .val { color: #888; font-size: 11px; margin-left: 8px; }
table.strata-grid { border-collapse: collapse; font-family: ui-monospace, Menlo, monospace; font-size: 12px; }
table.strata-grid td, table.strata-grid th { border: 1px solid #ddd; padding: 2px 5px; text-align: center; }
table.strata-grid a { text-decoration: none; }
""")

EMPTY = Markup("")
TOKEN = Markup('<span class="%(cls)s" data-act="%(value)s" title="activation %(value)s" '
               'style="background: rgba(249, 115, 22, %(alpha)s)">%(text)s</span>')
CONTEXT = Markup('<div class="strata-ctx">%(spans)s%(label)s</div>')
LABEL = Markup('<span class="val">%(text)s</span>')
TOKEN_CELL = Markup('<span class="tok">%(text)s</span>')
LINK = Markup('<a href="%(href)s" target="_self">%(text)s</a>')
CHIP = Markup('<a href="%(href)s" target="_self" title="activation %(value)s" '
              'style="background: rgba(249, 115, 22, %(alpha)s)">%(text)s</a>')
CELL = Markup("<%(tag)s>%(text)s</%(tag)s>")
ROW = Markup("<tr>%(cells)s</tr>")
TABLE = Markup('<table class="strata-grid">%(head)s%(rows)s</table>')


def visible_token(s: str) -> str:
    """A token as plain text with newlines, tabs and the empty token made visible (escaped where it is placed)."""
    s = s.replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "")
    return s if s else "\u2205"


def token_span(text: str, value: float, max_value: float, peak: bool = False) -> Markup:
    """One token shaded by `value / max_value`, its activation shown on hover."""
    alpha = 0.0 if max_value <= 0 else min(1.0, max(0.0, float(value) / max_value))
    return TOKEN % {"cls": "tok peak" if peak else "tok", "value": f"{float(value):.4g}", "alpha": f"{alpha:.3f}",
                    "text": visible_token(text)}


def context_html(tokens: np.ndarray, acts: np.ndarray, token_str, max_value: float | None = None,
                 label: str = "") -> Markup:
    """One example window: every token shaded by the feature's activation there, value on hover."""
    tokens, acts = np.asarray(tokens), np.asarray(acts, dtype=np.float64)
    valid = tokens >= 0
    if not valid.any():
        return EMPTY
    peak = int(np.argmax(np.where(valid, acts, -np.inf)))
    m = max_value if max_value else float(acts[valid].max())
    spans = EMPTY.join(token_span(token_str(int(t)), a, m, i == peak)
                       for i, (t, a) in enumerate(zip(tokens, acts)) if t >= 0)
    return CONTEXT % {"spans": spans, "label": LABEL % {"text": label} if label else EMPTY}


def contexts_html(tokens: np.ndarray, acts: np.ndarray, labels: list[str], token_str, max_value: float) -> Markup:
    return EMPTY.join(context_html(t, a, token_str, max_value, lab) for t, a, lab in zip(tokens, acts, labels))


def feature_href(train: str, sid: str, f: int) -> str:
    return "?" + urlencode({"page": "features", "train": train, "sae": sid, "f": int(f)})


def feature_link(train: str, sid: str, f: int, text: str | None = None) -> Markup:
    """An in-app link to a feature page (same tab)."""
    return LINK % {"href": feature_href(train, sid, f), "text": text if text is not None else f"{sid} #{f}"}


def feature_chip(train: str, sid: str, f: int, value: float, max_value: float) -> Markup:
    """A feature number linking to its page, shaded by its activation (the prompt explorer's cells)."""
    alpha = 0.0 if max_value <= 0 else min(1.0, float(value) / max_value)
    return CHIP % {"href": feature_href(train, sid, f), "value": f"{float(value):.3g}", "alpha": f"{alpha:.2f}",
                   "text": str(int(f))}


def _cell(value) -> Markup | str:
    """Markup as it is; anything else as text on one line (a newline in Streamlit markdown would end the
    HTML block and let the rest be read as markdown)."""
    return value if isinstance(value, Markup) else " ".join(str(value).splitlines())


def grid(head: list, rows: list[list]) -> Markup:
    """A table.strata-grid: plain cells are escaped, Markup cells (links, tokens) are kept."""
    def row(tag: str, cells: list) -> Markup:
        return ROW % {"cells": EMPTY.join(CELL % {"tag": tag, "text": _cell(c)} for c in cells)}

    return TABLE % {"head": row("th", head) if head else EMPTY, "rows": EMPTY.join(row("td", r) for r in rows)}
