"""Interventions on SAE features in the real model, and steering during generation.

An edit sets feature i of one SAE to alpha times its value (alpha = 0 zeroes it) at one token position or at
every position. The feature's value f_i is read from the activations the SAE encodes (`Site.read_keys`) and the
edit changes every activation the feature writes (`Site.writes`), each through the feature's own decoder
direction there:

    x_w + (alpha * f_i - f_i) * d_w        d_w = what feature i adds at key w per unit of value (raw units)

so only the feature's decoder contribution changes and the SAE's error term (x - reconstruction) is kept at every
key it writes. Where each mode reads and writes:

    layer, multilayer   the key it reads (a multi-layer SAE: the chosen KEY), the same key
    transcoder          mlp_in.L -> mlp_out.L
    clt                 feature s*n + j (layer block s, as the index numbers it) reads mlp_in.<layer s> and writes
                        mlp_out.<t> for every covered layer t >= s, through decoder_vectors(s, t, j)
    crosscoder          reads every key of the SAE and writes one decoder block per key: editing it edits them all

Values are computed live in the edited pass (a deeper edit sees what its upstream edits produced), except a
crosscoder's: it reads keys deeper than some it writes, so its value is the one on the clean prompt. Several
edits apply in one forward pass.

`intervene` runs the clean and the edited pass and reports the change of the top logits at one position and of
the features of the run's single-key SAEs and CLT layers that read deeper than the shallowest edit. `steer`
adds alpha x a feature's decoder direction at every key it writes, at every position, while generating
greedily, beside the clean continuation.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated

import torch
from annotated_types import Ge, Gt

from activations.config import option as _f
from activations.errors import StrataError
from activations.hooks import key_depth, splice, split_key

_EDIT = re.compile(r"(?P<sae>[^/:]+)(?:/(?P<key>[^:]+))?:(?P<feature>-?\d+)(?:@(?P<pos>-?\d+|all))?"
                   r"(?:\*(?P<alpha>[^*@]+))?")
EDIT_HELP = ("SAE[/KEY]:FEATURE[@POS][*ALPHA], several separated by ';' (e.g. resid.2:17@5*0); POS = token "
             "position (default every position), ALPHA = factor on the feature's value (default 0: zero it); "
             "KEY picks the layer of a multi-layer SAE; a CLT's features are numbered as in its index, layer block s "
             "latent j = s * n + j")
MODES = ("layer", "multilayer", "transcoder", "crosscoder", "clt")


@dataclass(frozen=True)
class Edit:
    sae: str                 # SAE id in the training run
    feature: int             # latent index (a CLT's: layer block s, latent j -> s * n + j)
    alpha: float = 0.0       # new value = alpha * current value (steering: coefficient on the decoder direction)
    pos: int | None = None   # token position; None = every position
    key: str | None = None   # the layer key of a multi-layer SAE (None: the SAE's only key)


def parse_edits(spec: str) -> list[Edit]:
    """'resid.2:17@5*0; ml/resid.1:3*2' -> [Edit, ...] (see EDIT_HELP)."""
    edits = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        m = _EDIT.fullmatch(part)
        if not m:
            raise StrataError(f"cannot read the edit {part!r}; write {EDIT_HELP}")
        alpha = 0.0
        if m["alpha"] is not None:
            try:
                alpha = float(m["alpha"])
            except ValueError:
                raise StrataError(f"alpha {m['alpha']!r} in edit {part!r} is not a number; write e.g. *0 or *2.5") from None
        pos = None if m["pos"] in (None, "all") else int(m["pos"])
        edits.append(Edit(m["sae"], int(m["feature"]), alpha, pos, m["key"]))
    return edits


@dataclass(frozen=True)
class Site:
    """Where one SAE feature's value is read and which activations an edit of it changes."""
    read_keys: tuple[str, ...]   # the activations its value is encoded from
    writes: tuple[str, ...]      # the activations it writes (one decoder direction each), shallowest first
    live: bool = True            # value computed in the edited pass; False: from the clean prompt (crosscoder)


def site_of(sae, sae_id: str, key: str | None, feature: int = 0) -> Site:
    cfg = sae.cfg
    if cfg.mode == "multilayer":
        if key is None and len(cfg.in_keys) > 1:
            raise StrataError(f"SAE {sae_id} is a multi-layer SAE: say which layer to edit with {sae_id}/KEY:..., "
                              f"KEY one of {', '.join(cfg.in_keys)}")
        key = key or cfg.in_keys[0]
        if key not in cfg.in_keys:
            raise StrataError(f"key {key!r} is not one of SAE {sae_id}'s layers; use one of {', '.join(cfg.in_keys)}")
        return Site((key,), (key,))
    if cfg.mode in ("clt", "crosscoder") and key is not None:
        what = "its layer is in the feature number (layer block s, latent j -> s * n + j)" if cfg.mode == "clt" \
            else "it reads and writes all its keys at once"
        raise StrataError(f"SAE {sae_id} is a {cfg.mode} and {what}: drop /{key} from the edit")
    if cfg.mode == "clt":
        s = feature // (cfg.n_latents // len(cfg.in_keys))
        return Site((cfg.in_keys[s],), tuple(cfg.out_keys[s:]))
    if cfg.mode == "crosscoder":
        return Site(tuple(cfg.in_keys), tuple(sorted(cfg.out_keys, key=key_depth)), live=False)
    if cfg.mode not in MODES or len(cfg.in_keys) != 1 or len(cfg.out_keys) != 1:
        raise StrataError(f"SAE {sae_id} ({cfg.mode}, reading {len(cfg.in_keys)} and writing {len(cfg.out_keys)} "
                          f"keys) has no known place to edit; interventions work on {', '.join(MODES)} SAEs")
    if key is not None and key != cfg.out_keys[0]:
        raise StrataError(f"SAE {sae_id} writes only {cfg.out_keys[0]}; drop /{key} from the edit")
    return Site((cfg.in_keys[0],), (cfg.out_keys[0],))


def check_edits(saes: dict, edits: list[Edit], n_tokens: int | None = None) -> None:
    """Every edit names an SAE of the run, a feature it has, a finite alpha and a position in the prompt."""
    if not edits:
        raise StrataError(f"no edit given; write {EDIT_HELP}")
    for e in edits:
        if e.sae not in saes:
            raise StrataError(f"SAE {e.sae!r} is not in this training run; use one of {', '.join(saes)}")
        n = int(saes[e.sae].cfg.n_latents)
        if not 0 <= e.feature < n:
            raise StrataError(f"feature {e.feature} does not exist: SAE {e.sae} has features 0-{n - 1}; pick one in range")
        if not math.isfinite(e.alpha):
            raise StrataError(f"alpha {e.alpha} for feature {e.feature} of {e.sae} is not a finite number; "
                              f"use a finite factor such as 0 or 2")
        if e.pos is not None and n_tokens is not None and not -n_tokens <= e.pos < n_tokens:
            raise StrataError(f"position {e.pos} is outside the prompt's {n_tokens} tokens; use 0-{n_tokens - 1}")
        site_of(saes[e.sae], e.sae, e.key, e.feature)


def direction(sae, feature: int, write_key: str) -> torch.Tensor:
    """The raw-unit change of the activation at write_key per unit of the feature's value."""
    cfg = sae.cfg
    if cfg.mode == "clt":
        n = cfg.n_latents // len(cfg.in_keys)
        src, tgt = cfg.layers[feature // n], split_key(write_key)[1]
        return sae.decoder_vectors(src, tgt, [feature % n])[0].float()
    if cfg.mode == "crosscoder":
        d, j = cfg.d_out // len(cfg.out_keys), cfg.out_keys.index(write_key)
        return sae.W_dec[feature, j * d:(j + 1) * d].float() / sae.out_scale(write_key)
    return sae.W_dec[feature].float() / sae.out_scale(write_key)


def codes(sae, site: Site, xs: dict) -> torch.Tensor:
    """The SAE's codes [T, n] (a CLT: its layer block's) from the activations {read key: [T, d]}."""
    cfg = sae.cfg
    if cfg.mode == "clt":
        (key,) = site.read_keys
        return sae.encode_layer(split_key(key)[1], xs[key].float()).float()
    if cfg.mode == "crosscoder":
        return sae.encode(torch.cat([xs[k].float() for k in cfg.in_keys], -1)).float()
    (key,) = site.read_keys
    return sae.encode(xs[key].float(), key=key if cfg.mode == "multilayer" else None).float()


def column(sae, feature: int) -> int:
    """The feature's column in `codes` (a CLT's codes hold one layer block)."""
    cfg = sae.cfg
    return feature % (cfg.n_latents // len(cfg.in_keys)) if cfg.mode == "clt" else feature


class _Hooks:
    """The splices of one forward pass: recorders (identity) and edits, entered together."""

    def __init__(self, model):
        self.model, self.stack = model, []

    def add(self, key: str, fn) -> None:
        self.stack.append(splice(self.model, key, fn))

    def __enter__(self):
        for cm in self.stack:
            cm.__enter__()
        return self

    def __exit__(self, *exc):
        for cm in reversed(self.stack):
            cm.__exit__(*exc)


def _record(seen: dict, slot):
    def record(x):
        seen[slot] = x[0]
        seen.pop(("codes", slot), None)  # this pass's codes are computed afresh from this activation
        return x
    return record


def _add_edits(hooks: _Hooks, saes: dict, edits: list[Edit], sites: list[Site], seen: dict, fixed: dict) -> None:
    """Every read key of an edited feature is recorded into `seen`; at every key the feature writes, the
    activation is shifted by its change of value times its decoder direction there. The codes come from what was
    recorded in the same pass (computed once per SAE and read site), or from `fixed[(sae, read_keys)]` for a
    site that is not live. Every recorder comes before every edit, so edits of one key all start from the value
    the activation had there."""
    for e, site in zip(edits, sites):
        for k in site.read_keys:
            hooks.add(k, _record(seen, ("read", e.sae, k)))
    for e, site in zip(edits, sites):
        for w in site.writes:
            hooks.add(w, _edit_fn(saes[e.sae], e, site, w, seen, fixed))


def _edit_fn(sae, e: Edit, site: Site, write_key: str, seen: dict, fixed: dict):
    vec_d = direction(sae, e.feature, write_key)

    def edit(x):
        if e.alpha == 1.0:  # the value stays (the clean pass records the edited SAEs' codes this way)
            return x
        f_T = _site_codes(sae, e.sae, site, seen, fixed)[:, column(sae, e.feature)]
        change_T = (e.alpha - 1.0) * f_T
        if e.pos is not None:  # one position: every other one keeps its value
            only_T = torch.zeros_like(f_T)
            only_T[e.pos] = 1.0
            change_T = change_T * only_T
        return x + (change_T[:, None] * vec_d.to(x.device)[None, :]).to(x.dtype)[None]
    return edit


def _site_codes(sae, sid: str, site: Site, seen: dict, fixed: dict) -> torch.Tensor:
    """The SAE's codes at `site` in this pass: `fixed` for a site that is not live, else computed once from the
    recorded activations and kept in `seen` until the read key is recorded again."""
    if not site.live and (sid, site.read_keys) in fixed:
        return fixed[(sid, site.read_keys)]
    slot = ("codes", ("read", sid, site.read_keys[0]))
    if slot not in seen:
        seen[slot] = codes(sae, site, {k: seen[("read", sid, k)] for k in site.read_keys})
    return seen[slot]


def _reader_sites(saes: dict, after: float) -> list[tuple[str, Site]]:
    """(SAE, site) of every single-key SAE slot and CLT layer that reads deeper than `after`, and of every crosscoder
    whose keys all lie deeper (one that reads keys on both sides of an edit mixes edited and unedited inputs, so its
    features are not reported downstream)."""
    out = []
    for sid, sae in saes.items():
        cfg = sae.cfg
        if cfg.mode == "crosscoder":
            if min(key_depth(k) for k in cfg.in_keys) > after:
                out.append((sid, Site(tuple(cfg.in_keys), ())))
            continue
        keys = cfg.in_keys if cfg.mode in ("multilayer", "clt") else cfg.in_keys[:1]
        for key in keys:
            if key_depth(key) > after:
                out.append((sid, Site((key,), ())))
    return out


@torch.no_grad()
def _pass(model, ids_1T, saes, edits, sites, after, fixed) -> tuple[torch.Tensor, dict, dict]:
    """(logits [T, vocab], {(sae, read key): codes} of the readers deeper than `after`, what was recorded: the
    activations each edited SAE read, and the codes computed from them)."""
    seen: dict = {}
    hooks = _Hooks(model)
    readers = _reader_sites(saes, after)
    for sid, site in readers:  # readers first: they see the activation before an edit there
        for key in site.read_keys:
            hooks.add(key, _record(seen, ("down", sid, key)))
    _add_edits(hooks, saes, edits, sites, seen, fixed)
    with hooks:
        logits_TV = model(input_ids=ids_1T, use_cache=False).logits[0].float()
    down = {(sid, site.read_keys[0]): codes(saes[sid], site, {k: seen[("down", sid, k)] for k in site.read_keys})
            for sid, site in readers}
    return logits_TV, down, seen


@torch.no_grad()
def intervene(model, tokenizer, saes: dict, ids_1T: torch.Tensor, edits: list[Edit], position: int = -1,
              top: int = 10, n_features: int = 10) -> dict:
    """Clean and edited pass on one prompt. Returns {"tokens", "position", "edits": [{sae, key, keys, feature, pos,
    alpha, clean_value}], "logits": [{token, id, clean, edited, delta, p_clean, p_edited}] (the `top` largest
    |delta| at `position`), "features": [{sae, key, feature, clean, edited, delta}] (the `n_features` largest
    |delta| at `position` among features read deeper than the shallowest edit)}."""
    n_tokens = ids_1T.shape[1]
    check_edits(saes, edits, n_tokens)
    if not -n_tokens <= position < n_tokens:
        raise StrataError(f"position {position} is outside the prompt's {n_tokens} tokens; use 0-{n_tokens - 1} or -1")
    position %= n_tokens
    sites = [site_of(saes[e.sae], e.sae, e.key, e.feature) for e in edits]
    after = min(key_depth(s.writes[0]) for s in sites)
    unchanged = [Edit(e.sae, e.feature, 1.0, e.pos, e.key) for e in edits]  # records the edited SAEs' clean codes
    clean_TV, clean_codes, clean_seen = _pass(model, ids_1T, saes, unchanged, sites, after, {})
    clean_read = {(e.sae, s.read_keys): _site_codes(saes[e.sae], e.sae, s, clean_seen, {})
                  for e, s in zip(edits, sites)}  # the edited SAEs' clean codes
    fixed = {(e.sae, s.read_keys): clean_read[(e.sae, s.read_keys)] for e, s in zip(edits, sites) if not s.live}
    edited_TV, edited_codes, _ = _pass(model, ids_1T, saes, edits, sites, after, fixed)

    c, d = clean_TV[position], edited_TV[position]
    pc, pd = c.softmax(-1), d.softmax(-1)
    delta = d - c
    order = delta.abs().topk(min(top, len(delta))).indices.tolist()
    logits = [{"token": tokenizer.decode([i]), "id": i, "clean": float(c[i]), "edited": float(d[i]),
               "delta": float(delta[i]), "p_clean": float(pc[i]), "p_edited": float(pd[i])} for i in order]

    features = []
    for (sid, key), clean_Tn in clean_codes.items():
        cf, ef = clean_Tn[position], edited_codes[(sid, key)][position]
        diff = ef - cf
        offset = _block_offset(saes[sid], key)
        for j in diff.abs().topk(min(n_features, len(diff))).indices.tolist():
            if diff[j] != 0:
                features.append({"sae": sid, "key": key, "feature": offset + j, "clean": float(cf[j]),
                                 "edited": float(ef[j]), "delta": float(diff[j])})
    features.sort(key=lambda r: -abs(r["delta"]))

    applied = []
    for e, site in zip(edits, sites):
        pos = position if e.pos is None else e.pos % n_tokens
        value = clean_read[(e.sae, site.read_keys)]
        applied.append({"sae": e.sae, "key": site.writes[0], "keys": list(site.writes), "feature": e.feature,
                        "pos": e.pos, "alpha": e.alpha,
                        "clean_value": float(value[pos, column(saes[e.sae], e.feature)])})
    tokens = tokenizer.batch_decode([[int(t)] for t in ids_1T[0]], clean_up_tokenization_spaces=False)
    return {"tokens": tokens, "position": position, "edits": applied, "logits": logits, "features": features[:n_features]}


def _block_offset(sae, read_key: str) -> int:
    """A CLT layer's codes are one block of its features: block s starts at s * n (0 for every other SAE)."""
    cfg = sae.cfg
    if cfg.mode != "clt":
        return 0
    return cfg.in_keys.index(read_key) * (cfg.n_latents // len(cfg.in_keys))


@torch.no_grad()
def steer(model, tokenizer, saes: dict, ids_1T: torch.Tensor, steers: list[Edit], new_tokens: int = 20) -> dict:
    """Greedy continuation of the prompt, clean and with alpha x each feature's decoder direction added at every
    key it writes, at every position (prompt and generated). Returns {"clean": text, "steered": text}."""
    check_edits(saes, [Edit(s.sae, s.feature, s.alpha, None, s.key) for s in steers])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate():
        out = model.generate(ids_1T, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                             attention_mask=torch.ones_like(ids_1T))
        return tokenizer.decode(out[0, ids_1T.shape[1]:], skip_special_tokens=True)

    clean = generate()
    hooks = _Hooks(model)
    for s in steers:
        for w in site_of(saes[s.sae], s.sae, s.key, s.feature).writes:
            vec_d = s.alpha * direction(saes[s.sae], s.feature, w)
            hooks.add(w, lambda x, _v=vec_d: x + _v.to(device=x.device, dtype=x.dtype))
    with hooks:
        steered = generate()
    return {"clean": clean, "steered": steered}


def format_table(result: dict) -> str:
    """The logit change table (and the downstream features) as text for the terminal."""
    pos = result["position"]
    lines = [f"edits at {', '.join(_edit_line(e) for e in result['edits'])}",
             f"top logit changes at position {pos} ({result['tokens'][pos]!r}):",
             f"{'token':>16} {'clean':>9} {'edited':>9} {'delta':>9} {'p clean':>8} {'p edited':>8}"]
    for r in result["logits"]:
        lines.append(f"{r['token']!r:>16} {r['clean']:9.3f} {r['edited']:9.3f} {r['delta']:+9.3f} "
                     f"{r['p_clean']:8.4f} {r['p_edited']:8.4f}")
    if result["features"]:
        lines.append(f"downstream features that change most at position {pos}:")
        lines.append(f"{'sae':>16} {'key':>10} {'feature':>8} {'clean':>9} {'edited':>9} {'delta':>9}")
        for r in result["features"]:
            lines.append(f"{r['sae']:>16} {r['key']:>10} {r['feature']:8d} {r['clean']:9.3f} {r['edited']:9.3f} "
                         f"{r['delta']:+9.3f}")
    else:
        lines.append("no downstream feature changes at this position")
    return "\n".join(lines)


def _edit_line(e: dict) -> str:
    where = "every position" if e["pos"] is None else f"position {e['pos']}"
    keys = ", ".join(e.get("keys") or [e["key"]])
    return f"{e['sae']}:{e['feature']} @ {keys} ({where}, x{e['alpha']:g}, clean value {e['clean_value']:.3f})"


# ---------------------------------------------------------------- `strata intervene RUN`
@dataclass
class InterveneConfig:
    run_dir: str = _f("", "run directory", cli=False)
    name: str = _f("", "training run whose SAEs are edited (RUN/train/<name>)")
    prompt: str = _f("", "the text to run")
    edit: str = _f("", EDIT_HELP)
    position: int = _f(-1, "token position whose logits and downstream features are reported (-1 = last)")
    top: Annotated[int, Gt(0)] = _f(10, "logits shown (largest change first)")
    features: Annotated[int, Ge(0)] = _f(10, "downstream features shown (largest change first)")
    steer: str = _f("", "features to steer with during generation, same form as --edit; ALPHA = coefficient on the "
                        "decoder direction added at every position (empty = no steering)")
    new_tokens: Annotated[int, Gt(0)] = _f(20, "tokens generated for steering (greedy)")
    max_tokens: Annotated[int, Gt(0)] = _f(256, "prompt tokens kept")
    device: str = _f("auto", "auto, cpu, cuda")


def run_intervention(cfg: InterveneConfig) -> str:
    """Check everything that can be checked before the model loads, then edit, re-run and format the tables."""
    from activations.manifest import load_manifest
    from activations.model import load_model, resolve_device
    from sae.checkpoint import load_saes

    if not cfg.name:
        raise StrataError("no training run given; pass --name NAME (a folder under RUN/train)")
    if not cfg.prompt:
        raise StrataError("no prompt given; pass --prompt TEXT")
    edits = parse_edits(cfg.edit)
    steers = parse_edits(cfg.steer)
    if not edits and not steers:
        raise StrataError(f"nothing to do: pass --edit and/or --steer ({EDIT_HELP})")
    manifest = load_manifest(cfg.run_dir)
    device = resolve_device(cfg.device)
    saes = {sid: s.eval() for sid, s in load_saes(cfg.run_dir, cfg.name, device).items()}
    for group in (edits, steers):
        if group:
            check_edits(saes, group)
    lm = load_model(manifest.model["id"], device=device)
    ids_1T = lm.tokenizer(cfg.prompt, return_tensors="pt").input_ids[:, :cfg.max_tokens].to(device)
    out = []
    if edits:
        out.append(format_table(intervene(lm.model, lm.tokenizer, saes, ids_1T, edits, cfg.position, cfg.top,
                                          cfg.features)))
    if steers:
        text = steer(lm.model, lm.tokenizer, saes, ids_1T, steers, cfg.new_tokens)
        out.append(f"clean continuation:   {text['clean']!r}\nsteered continuation: {text['steered']!r}")
    return "\n".join(out)
