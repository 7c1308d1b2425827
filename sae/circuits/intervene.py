"""Interventions on SAE features in the real model, and steering during generation.

An edit sets feature i of one SAE to alpha times its value (alpha = 0 zeroes it) at one token position or at
every position. The SAE reads its input at `read_key` and writes at `edit_key` (the same key for per-layer and
multi-layer SAEs; mlp_in.L -> mlp_out.L for a transcoder). With codes f computed live from the activation at
read_key, the activation at edit_key becomes

    x + (alpha * f_i - f_i) * W_dec[i] / out_scale(edit_key)     (raw units)

so only the feature's own decoder contribution changes and the SAE's error term (x - reconstruction) is kept.
Several edits apply in one forward pass; a deeper edit sees the values its upstream edits produced.

`intervene` runs the clean and the edited pass and reports the change of the top logits at one position and of
the features of the run's other SAEs that read deeper than the shallowest edit. `steer` adds alpha x a feature's
decoder direction at its edit key at every position while generating greedily, beside the clean continuation.
A crosscoder or a cross-layer transcoder reads or writes several layers at once, so its features have no single
place to edit: they are refused.
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
from activations.hooks import key_depth, splice

_EDIT = re.compile(r"(?P<sae>[^/:]+)(?:/(?P<key>[^:]+))?:(?P<feature>-?\d+)(?:@(?P<pos>-?\d+|all))?"
                   r"(?:\*(?P<alpha>[^*@]+))?")
EDIT_HELP = ("SAE[/KEY]:FEATURE[@POS][*ALPHA], several separated by ';' (e.g. resid.2:17@5*0); POS = token "
             "position (default every position), ALPHA = factor on the feature's value (default 0: zero it); "
             "KEY picks the layer of a multi-layer SAE")


@dataclass(frozen=True)
class Edit:
    sae: str                 # SAE id in the training run
    feature: int             # latent index
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
    """Where one SAE's feature is read and written."""
    read_key: str
    edit_key: str


def site_of(sae, sae_id: str, key: str | None) -> Site:
    cfg = sae.cfg
    if cfg.mode == "crosscoder":
        raise StrataError(f"SAE {sae_id} is a crosscoder (it reads {len(cfg.in_keys)} layers at once), so its features "
                          f"have no single place to edit; intervene on a per-layer, multi-layer SAE or a transcoder")
    if cfg.mode == "multilayer":
        if key is None and len(cfg.in_keys) > 1:
            raise StrataError(f"SAE {sae_id} is a multi-layer SAE: say which layer to edit with {sae_id}/KEY:..., "
                              f"KEY one of {', '.join(cfg.in_keys)}")
        key = key or cfg.in_keys[0]
        if key not in cfg.in_keys:
            raise StrataError(f"key {key!r} is not one of SAE {sae_id}'s layers; use one of {', '.join(cfg.in_keys)}")
        return Site(key, key)
    if len(cfg.in_keys) != 1 or len(cfg.out_keys) != 1:
        raise StrataError(f"SAE {sae_id} ({cfg.mode}) reads or writes several keys at once, so its features have no "
                          f"single place to edit; intervene on a per-layer, multi-layer SAE or a per-layer transcoder")
    if key is not None and key != cfg.out_keys[0]:
        raise StrataError(f"SAE {sae_id} writes only {cfg.out_keys[0]}; drop /{key} from the edit")
    return Site(cfg.in_keys[0], cfg.out_keys[0])


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
        site_of(saes[e.sae], e.sae, e.key)


def direction(sae, feature: int, edit_key: str) -> torch.Tensor:
    """The raw-unit change of the SAE's output at edit_key per unit of the feature's value."""
    return sae.W_dec[feature].float() / sae.out_scale(edit_key)


def _codes(sae, x_Td: torch.Tensor, read_key: str) -> torch.Tensor:
    key = read_key if sae.cfg.mode == "multilayer" else None
    return sae.encode(x_Td.float(), key=key).float()


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


def _add_edits(hooks: _Hooks, saes: dict, edits: list[Edit], seen: dict) -> None:
    """Edits grouped by (SAE, site): the read key's activation is recorded into `seen`, the edit key's is
    shifted by the feature's change (computed from what was recorded in the same pass)."""
    groups: dict[tuple, list[Edit]] = {}
    for e in edits:
        groups.setdefault((e.sae, site_of(saes[e.sae], e.sae, e.key)), []).append(e)
    for (sid, site), group in groups.items():
        sae = saes[sid]
        slot = ("read", sid, site.read_key)

        def record(x, _slot=slot):
            seen[_slot] = x
            return x

        def edit(x, _sae=sae, _site=site, _group=group, _slot=slot):
            f_Tn = _codes(_sae, seen[_slot][0], _site.read_key)
            delta_Td = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
            for e in _group:
                f_T = f_Tn[:, e.feature]
                change_T = (e.alpha - 1.0) * f_T
                if e.pos is not None:  # one position: every other one keeps its value
                    only_T = torch.zeros_like(f_T)
                    only_T[e.pos] = 1.0
                    change_T = change_T * only_T
                delta_Td += change_T[:, None] * direction(_sae, e.feature, _site.edit_key).to(x.device)[None, :]
            return x + delta_Td.to(x.dtype)[None]

        hooks.add(site.read_key, record)
        hooks.add(site.edit_key, edit)


def _add_readers(hooks: _Hooks, saes: dict, after: float, seen: dict) -> list[tuple[str, str]]:
    """Record the input of every single-key (SAE, key) slot that reads deeper than `after`."""
    slots = []
    for sid, sae in saes.items():
        if sae.cfg.mode != "multilayer" and (len(sae.cfg.in_keys) != 1 or len(sae.cfg.out_keys) != 1):
            continue  # crosscoders and cross-layer transcoders read several keys at once
        for key in (sae.cfg.in_keys if sae.cfg.mode == "multilayer" else sae.cfg.in_keys[:1]):
            if key_depth(key) > after:
                slots.append((sid, key))
                hooks.add(key, lambda x, _s=(sid, key): seen.__setitem__(_s, x) or x)
    return slots


@torch.no_grad()
def _pass(model, ids_1T, saes, edits, after) -> tuple[torch.Tensor, dict, dict]:
    """(logits [T, vocab], codes of the readers deeper than `after`, codes each edited SAE read)."""
    seen: dict = {}
    hooks = _Hooks(model)
    slots = _add_readers(hooks, saes, after, seen)  # readers first: they see the activation before an edit there
    if edits:
        _add_edits(hooks, saes, edits, seen)
    with hooks:
        logits_TV = model(input_ids=ids_1T, use_cache=False).logits[0].float()
    codes = {s: _codes(saes[s[0]], seen[s][0], s[1]) for s in slots}
    edited = {(s[1], s[2]): _codes(saes[s[1]], x[0], s[2]) for s, x in seen.items() if s[0] == "read"}
    return logits_TV, codes, edited


@torch.no_grad()
def intervene(model, tokenizer, saes: dict, ids_1T: torch.Tensor, edits: list[Edit], position: int = -1,
              top: int = 10, n_features: int = 10) -> dict:
    """Clean and edited pass on one prompt. Returns {"tokens", "position", "edits": [{sae, key, feature, pos,
    alpha, clean_value}], "logits": [{token, id, clean, edited, delta, p_clean, p_edited}] (the `top` largest
    |delta| at `position`), "features": [{sae, key, feature, clean, edited, delta}] (the `n_features` largest
    |delta| at `position` among features read deeper than the shallowest edit)}."""
    n_tokens = ids_1T.shape[1]
    check_edits(saes, edits, n_tokens)
    if not -n_tokens <= position < n_tokens:
        raise StrataError(f"position {position} is outside the prompt's {n_tokens} tokens; use 0-{n_tokens - 1} or -1")
    position %= n_tokens
    after = min(key_depth(site_of(saes[e.sae], e.sae, e.key).edit_key) for e in edits)
    unchanged = [Edit(e.sae, e.feature, 1.0, e.pos, e.key) for e in edits]  # records the edited SAEs' clean codes
    clean_TV, clean_codes, clean_read = _pass(model, ids_1T, saes, unchanged, after)
    edited_TV, edited_codes, _ = _pass(model, ids_1T, saes, edits, after)

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
        for j in diff.abs().topk(min(n_features, len(diff))).indices.tolist():
            if diff[j] != 0:
                features.append({"sae": sid, "key": key, "feature": j, "clean": float(cf[j]), "edited": float(ef[j]),
                                 "delta": float(diff[j])})
    features.sort(key=lambda r: -abs(r["delta"]))

    applied = []
    for e in edits:
        site = site_of(saes[e.sae], e.sae, e.key)
        pos = position if e.pos is None else e.pos % n_tokens
        value = clean_read[(e.sae, site.read_key)]
        applied.append({"sae": e.sae, "key": site.edit_key, "feature": e.feature, "pos": e.pos, "alpha": e.alpha,
                        "clean_value": float(value[pos, e.feature])})
    tokens = tokenizer.batch_decode([[int(t)] for t in ids_1T[0]], clean_up_tokenization_spaces=False)
    return {"tokens": tokens, "position": position, "edits": applied, "logits": logits, "features": features[:n_features]}


@torch.no_grad()
def steer(model, tokenizer, saes: dict, ids_1T: torch.Tensor, steers: list[Edit], new_tokens: int = 20) -> dict:
    """Greedy continuation of the prompt, clean and with alpha x each feature's decoder direction added at its
    edit key at every position (prompt and generated). Returns {"clean": text, "steered": text}."""
    check_edits(saes, [Edit(s.sae, s.feature, s.alpha, None, s.key) for s in steers])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate():
        out = model.generate(ids_1T, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                             attention_mask=torch.ones_like(ids_1T))
        return tokenizer.decode(out[0, ids_1T.shape[1]:], skip_special_tokens=True)

    clean = generate()
    hooks = _Hooks(model)
    for s in steers:
        site = site_of(saes[s.sae], s.sae, s.key)
        vec_d = s.alpha * direction(saes[s.sae], s.feature, site.edit_key)
        hooks.add(site.edit_key, lambda x, _v=vec_d: x + _v.to(device=x.device, dtype=x.dtype))
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
    return f"{e['sae']}:{e['feature']} @ {e['key']} ({where}, x{e['alpha']:g}, clean value {e['clean_value']:.3f})"


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
