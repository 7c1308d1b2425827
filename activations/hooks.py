"""Where activations live inside a transformers model, and forward hooks that read or replace them.

A key is "<site>.<layer>":
  resid.L     residual stream entering block L (resid.0 = embedding output, resid.n = last block's output,
              taken before the final norm)
  mlp_in.L    input of block L's MLP          mlp_out.L   output of block L's MLP
  attn_out.L  output of block L's attention
`capture` records keys during one forward pass and stops the pass as soon as the deepest one is recorded
(early exit). `splice` replaces one activation with fn(activation) for the length of a `with` block.
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from activations.errors import StrataError

SITES = ("resid", "mlp_in", "mlp_out", "attn_out")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: the first ModuleList as long as the config's layer count."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = cfg.num_hidden_layers
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise StrataError(f"cannot find the {n} transformer blocks of {type(model).__name__}; this architecture is not supported")


def n_layers(model: nn.Module) -> int:
    return len(blocks(model))


def _child(block: nn.Module, names, what: str, key: str) -> nn.Module:
    for name in names:
        if hasattr(block, name) and isinstance(getattr(block, name), nn.Module):
            return getattr(block, name)
    raise StrataError(f"site {key}: this model's blocks have no {what} module ({type(block).__name__}); use --sites resid")


def parse_layers(spec: str | list | int, upper: int) -> list[int]:
    """'all', '3', '0-29:3', '1,4,7-9' -> sorted layer list; `upper` is the largest valid layer."""
    if isinstance(spec, int):
        spec = str(spec)
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(s) for s in spec)
    spec = spec.strip()
    if spec in ("all", ""):
        return list(range(upper + 1))
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*(?::\s*(\d+))?)?\s*", part)
        if not m:
            raise StrataError(f"bad layer spec {part!r}; use ints and ranges like 0-29:3 or 1,4,7-9")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        step = int(m.group(3)) if m.group(3) else 1
        if step <= 0 or b < a:
            raise StrataError(f"bad layer range {part!r}; write a-b[:step] with a <= b and step >= 1")
        out.update(range(a, b + 1, step))
    bad = sorted(x for x in out if x > upper)
    if bad:
        raise StrataError(f"layer {bad[0]} does not exist: this model has layers 0-{upper} for these sites; pick layers in that range")
    return sorted(out)


def parse_keys(sites: str | list, layers: str | list, model_layers: int) -> list[str]:
    """Keys for every (site, layer); resid has layers 0..n, the other sites 0..n-1."""
    site_list = [s.strip() for s in (sites.split(",") if isinstance(sites, str) else sites) if s.strip()]
    if not site_list:
        raise StrataError("no hook site given; use --sites with one or more of " + ", ".join(SITES))
    keys = []
    for site in site_list:
        if site not in SITES:
            raise StrataError(f"unknown site {site!r}; use one or more of {', '.join(SITES)}")
        upper = model_layers if site == "resid" else model_layers - 1
        keys += [f"{site}.{layer}" for layer in parse_layers(layers, upper)]
    return keys


def split_key(key: str) -> tuple[str, int]:
    site, _, layer = key.rpartition(".")
    if site not in SITES or not layer.isdigit():
        raise StrataError(f"bad activation key {key!r}; keys look like resid.3 or mlp_out.12")
    return site, int(layer)


def key_depth(key: str) -> float:
    """Order of keys along the forward pass (for early exit and sorting)."""
    site, layer = split_key(key)
    return {"resid": layer - 0.5, "attn_out": layer + 0.1, "mlp_in": layer + 0.2, "mlp_out": layer + 0.3}[site]


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    return (new,) + tuple(x[1:]) if isinstance(x, tuple) else new


def _hook_point(model: nn.Module, key: str):
    """(module, kind) where kind is 'pre' (the activation is the module's first input) or 'post' (its output)."""
    site, layer = split_key(key)
    bl = blocks(model)
    n = len(bl)
    if site == "resid":
        if layer > n:
            raise StrataError(f"layer {layer} does not exist for resid (0-{n}); pick a layer in range")
        return (bl[layer], "pre") if layer < n else (bl[n - 1], "post")
    if layer >= n:
        raise StrataError(f"layer {layer} does not exist for {site} (0-{n - 1}); pick a layer in range")
    if site == "attn_out":
        return _child(bl[layer], _ATTN_NAMES, "attention", key), "post"
    mlp = _child(bl[layer], _MLP_NAMES, "MLP", key)
    return mlp, ("pre" if site == "mlp_in" else "post")


def attention_module(model: nn.Module, layer: int) -> nn.Module:
    """Block `layer`'s attention module: its output is attn_out.<layer>."""
    return _hook_point(model, f"attn_out.{layer}")[0]


class _StopForward(Exception):
    pass


def _input_of(args, kwargs):
    if args:
        return args[0]
    return kwargs.get("hidden_states", next(iter(kwargs.values())))


def capture(model: nn.Module, keys: list[str], input_ids: torch.Tensor, attention_mask=None,
            past_key_values=None) -> dict[str, torch.Tensor]:
    """Run the model on `input_ids` and return {key: activation [batch, tokens, d]} (detached). With
    `past_key_values` (a transformers cache of a prefix, which the call extends), `input_ids` continue that prefix."""
    return capture_at(model, {key: _hook_point(model, key) for key in keys}, input_ids, attention_mask,
                      past_key_values)


def capture_at(model: nn.Module, points: dict, input_ids: torch.Tensor, attention_mask=None,
               past_key_values=None) -> dict:
    """{name: tensor} for `points` {name: (module, "pre" | "post")}: the input ("pre") or output ("post") of each
    module, detached, from one forward pass that stops as soon as every one is in hand."""
    out: dict = {}
    handles = []
    wanted = set(points)

    def record(name, value):
        out[name] = value.detach()
        if wanted.issubset(out):
            raise _StopForward  # every point is in hand: skip the rest of the model

    for name, (mod, kind) in points.items():
        if kind == "pre":
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, kw, _k=name: record(_k, _input_of(a, kw)), with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, _k=name: record(_k, _first(o))))
    try:
        with torch.no_grad():
            if past_key_values is None:
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            else:  # transformers >= 5.24 names the argument `cache`, earlier versions `past_key_values`
                import inspect

                arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{arg: past_key_values})
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = wanted - set(out)
    if missing:
        raise StrataError(f"the forward pass never reached {sorted(missing, key=str)[0]}; this model routes around "
                          "that site")
    return out


@contextlib.contextmanager
def splice(model: nn.Module, key: str, fn):
    """Inside the block, the activation at `key` is replaced by fn(activation) on every forward pass."""
    mod, kind = _hook_point(model, key)
    if kind == "pre":
        def pre(m, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs
        handle = mod.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        handle = mod.register_forward_hook(lambda m, a, o: _replace_first(o, fn(_first(o))))
    try:
        yield
    finally:
        handle.remove()


def unembedding(model: nn.Module) -> tuple[nn.Module | None, torch.Tensor]:
    """(final norm module or None, unembedding matrix [vocab, d]) for logit-lens style effects."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is None:
        raise StrataError(f"{type(model).__name__} has no unembedding (not a causal LM); logit effects need a causal LM")
    base = getattr(model, "base_model", model)
    norm = None
    for name in _NORM_NAMES:
        cand = getattr(base, name, None)
        if isinstance(cand, nn.Module):
            norm = cand
            break
    return norm, out_emb.weight
