"""`strata share RUN --features SPEC`: a static HTML bundle of chosen feature pages that opens with no Python
and no network: RUN/share/index.html, one page per feature (<sae>/<feature>.html), and plotly.js copied from
the installed plotly package into assets/ (no CDN). Written to a temporary folder and swapped in whole.

SPEC: "all"; "top:N" (the N densest features of each SAE); "3,7,10-20" (those indices in every SAE);
"resid.3:1,2;resid.6:5" (per SAE). Corpus text is escaped exactly as in the app (dashboard/render.py).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from activations import layout
from activations.atomic import replace_dir
from activations.errors import StrataError
from dashboard import charts, data
from dashboard.render import CSS, contexts_html, esc, show_token
from sae.analysis.index_file import FeatureIndex

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}} h1{{font-size:22px}}
h2{{font-size:17px;margin-top:22px}} .muted{{color:#666}} {css}</style>{head}</head><body>{body}</body></html>"""


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", s)


def _indices(spec: str, n: int) -> list[int]:
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise StrataError(f"bad feature list {part!r}; use all, top:N, 1,2,5-9 or sae:1,2;sae2:3")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out.update(i for i in range(a, b + 1) if i < n)
    return sorted(out)


def select_features(idx: FeatureIndex, spec: str) -> dict[str, list[int]]:
    spec = spec.strip()
    if spec == "all":
        return {s: list(range(idx.n_latents(s))) for s in idx.sae_ids}
    if spec.startswith("top:"):
        k = int(spec[4:]) if spec[4:].isdigit() else 0
        if k <= 0:
            raise StrataError(f"bad feature spec {spec!r}; write top:N with N > 0")
        return {s: sorted(np.argsort(-idx.column(s, "frequency"), kind="stable")[:k].tolist()) for s in idx.sae_ids}
    if ":" in spec:
        out = {}
        for part in spec.split(";"):
            sid, _, lst = part.partition(":")
            idx.info(sid.strip())  # raises for unknown ids
            out[sid.strip()] = _indices(lst, idx.n_latents(sid.strip()))
        return out
    return {s: _indices(spec, idx.n_latents(s)) for s in idx.sae_ids}


def fig_html(fig) -> str:
    return fig.to_html(include_plotlyjs=False, full_html=False, config={"displaylogo": False})


def feature_page(idx: FeatureIndex, sid: str, f: int, shared: dict[str, set], train: str) -> str:
    rec = idx.feature(sid, f)
    info = idx.info(sid)
    layers = info["cfg"].get("layers") or [int(k.rsplit(".", 1)[1]) for k in info["cfg"].get("in_keys", [])]
    multi = info["mode"] == "multilayer"
    label = lambda v, s: f"{v:.3g}" + (f" @ layer {layers[int(s)]}" if multi else "")

    def link(s, j, text=None):
        text = esc(text if text is not None else f"{s} #{j}")
        if j in shared.get(s, ()):
            return f'<a href="../{esc(safe_name(s))}/{int(j)}.html">{text}</a>'
        return text

    parts = [f"<p><a href='../index.html'>← all features</a></p><h1>{esc(sid)} · feature {f}</h1>"]
    if "explanation" in rec:
        parts.append(f"<p><strong>Explanation:</strong> {esc(rec['explanation'])} "
                     f"<span class='muted'>(detection F1 {float(rec['explanation_score']):.2f})</span></p>")
    parts.append(f"<p>density {float(rec['frequency']):.3%} · firings {int(rec['count']):,} · mean act "
                 f"{float(rec['mean_act']):.3g} · max act {float(rec['max_act']):.3g}</p>")
    ok = rec["top_row"] >= 0
    parts.append("<h2>Top activations</h2>" + contexts_html(
        rec["top_tokens"][ok], rec["top_acts"][ok], [label(v, s) for v, s in zip(rec["top_value"][ok], rec["top_slot"][ok])],
        idx.token_str, float(rec["max_act"])))
    ok = rec["sample_row"] >= 0
    if ok.any():
        parts.append("<h2>Samples from activation quantile intervals</h2>")
        for q in np.unique(rec["sample_interval"][ok]):
            m = rec["sample_interval"][ok] == q
            parts.append(f"<p class='muted'>interval {int(q) + 1}</p>" + contexts_html(
                rec["sample_tokens"][ok][m], rec["sample_acts"][ok][m],
                [label(v, s) for v, s in zip(rec["sample_value"][ok][m], rec["sample_slot"][ok][m])],
                idx.token_str, float(rec["max_act"])))
    if float(rec["hist_hi"]) > 0:
        parts.append(fig_html(charts.activation_histogram(np.asarray(rec["hist_counts"]), float(rec["hist_hi"]))))
    if "logit_top_ids" in rec:
        rows = "".join(f"<tr><td><code>{show_token(idx.token_str(int(a)))}</code></td><td>{float(av):+.3f}</td>"
                       f"<td><code>{show_token(idx.token_str(int(b)))}</code></td><td>{float(bv):+.3f}</td></tr>"
                       for a, av, b, bv in zip(rec["logit_top_ids"], rec["logit_top_vals"], rec["logit_bottom_ids"],
                                               rec["logit_bottom_vals"]))
        parts.append("<h2>Logit effects</h2><table class='strata-grid'><tr><th>promoted</th><th></th><th>suppressed"
                     f"</th><th></th></tr>{rows}</table>")
    nb = "".join(f"<tr><td>{link(sid, int(j), f'#{int(j)}')}</td><td>{float(c):.3f}</td></tr>"
                 for j, c in zip(rec["neighbour_idx"], rec["neighbour_cos"]))
    parts.append(f"<h2>Nearest features (decoder cosine)</h2><table class='strata-grid'>{nb}</table>")
    if "layer_mass" in rec:
        parts.append(fig_html(charts.layer_profile(layers, rec["layer_mass"])))
    if "decoder_layer_norm" in rec:
        out_layers = [int(k.rsplit(".", 1)[1]) for k in info["cfg"]["out_keys"]]
        parts.append(fig_html(charts.layer_profile(out_layers, rec["decoder_layer_norm"], "decoder norm per layer")))
    if info.get("match_next"):
        rows = "".join(f"<tr><td>{link(info['match_next'], int(j))}</td><td>{float(c):.3f}</td><td>{float(r):.3f}</td></tr>"
                       for j, c, r in zip(rec["match_idx"], rec["match_cos"], rec["match_corr"]))
        parts.append("<h2>Matches in the next layer</h2><table class='strata-grid'><tr><th>feature</th><th>decoder cos"
                     f"</th><th>act. corr</th></tr>{rows}</table>")
    head = '<script src="../assets/plotly.min.js"></script>'
    return PAGE.format(title=esc(f"{sid} #{f} — {train}"), css=CSS, head=head, body="".join(parts))


def index_page(idx: FeatureIndex, chosen: dict[str, list[int]], train: str, run_name: str) -> str:
    parts = [f"<h1>Strata features — {esc(run_name)} / {esc(train)}</h1>",
             f"<p class='muted'>index over {int(idx.meta.get('tokens', 0)):,} tokens; model "
             f"{esc(idx.meta.get('model', {}).get('id', '?'))}</p>"]
    if idx.residual_similarity:
        parts.append(fig_html(charts.residual_similarity(idx.residual_similarity)))
    for sid, feats in chosen.items():
        expl = idx.column(sid, "explanation")
        freq, mx = idx.column(sid, "frequency"), idx.column(sid, "max_act")
        rows = "".join(f"<tr><td><a href='{esc(safe_name(sid))}/{f}.html'>#{f}</a></td><td>{freq[f]:.2e}</td>"
                       f"<td>{mx[f]:.3g}</td><td style='text-align:left'>{esc(expl[f]) if expl is not None else ''}</td></tr>"
                       for f in feats)
        parts.append(f"<h2>{esc(sid)} <span class='muted'>({len(feats)} of {idx.n_latents(sid)} features)</span></h2>"
                     "<table class='strata-grid'><tr><th>feature</th><th>density</th><th>max act</th>"
                     f"<th>explanation</th></tr>{rows}</table>")
    head = '<script src="assets/plotly.min.js"></script>'
    return PAGE.format(title=esc(f"Strata — {train}"), css=CSS, head=head, body="".join(parts))


def write_share(run, features: str = "top:100", train: str | None = None, out=None) -> Path:
    """Write the bundle; returns the folder (RUN/share by default)."""
    from plotly.offline import get_plotlyjs

    run = data.check_run(run)
    names = data.index_names(run)
    if not names:
        raise StrataError(f"{run} has no feature index; run `strata analyze {run}` first")
    train = train or names[0]
    if train not in names:
        raise StrataError(f"no index for training run {train!r}; choose one of {', '.join(names)}")
    idx = FeatureIndex(layout.index_path(run, train))
    chosen = select_features(idx, features)
    final = Path(out) if out else layout.share_dir(run)
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "assets").mkdir(parents=True)
    (tmp / "assets" / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")
    shared = {s: set(v) for s, v in chosen.items()}
    try:
        for sid, feats in chosen.items():
            folder = tmp / safe_name(sid)
            folder.mkdir()
            for f in feats:
                (folder / f"{f}.html").write_text(feature_page(idx, sid, f, shared, train), encoding="utf-8")
        (tmp / "index.html").write_text(index_page(idx, chosen, train, run.name), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        idx.close()
    replace_dir(tmp, final, "share")
    return final
