"""Read one SAELens SAE folder for `strata import`: every field it uses is checked, and what SAELens applies
around the weights is folded in, so the Strata SAE computes the same encodings and reconstructions.

The folder: cfg.json, sae_weights.safetensors, optionally sparsity.safetensors ("sparsity": log10 firing
frequency) and activation_scaler.json ({"scaling_factor": s}, written beside checkpoints by SAELens' trainer).

SAELens 6.x semantics, as read from sae_lens/saes/sae.py and topk_sae.py (inference classes):
    encode(x) = act(pre),   pre = (norm_in(x) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    decode(f) = norm_out(f @ W_dec + b_dec)
    act: standard relu(pre); jumprelu relu(pre) * (pre > threshold); topk the k largest entries of pre, relu'd.
rescale_acts_by_decoder_norm (a TopK field; true by default in its training config): with n_i = ||W_dec[i]||,
    TopK picks from pre * n and decode multiplies f_i by 1 / n_i before W_dec. That is exactly the plain TopK
    SAE with W_enc' = W_enc * n, b_enc' = b_enc * n, W_dec' = W_dec / n (unit decoder rows), what SAELens' own
    fold_W_dec_norm computes; we import those weights. (A latent with n_i = 0 contributes nothing either way;
    SAELens would divide by zero.) Standard and jumprelu configs have no such field: SAELens drops it, and so
    do we.
normalize_activations:
    none                      norm_in = norm_out = identity.
    expected_average_only_in  the SAE module itself is the identity here too: SAELens' trainer multiplies every
                              input by a scalar s = sqrt(d_in) / E||x|| (kept in activation_scaler.json) and
                              folds it into the weights when it saves the final model (then writes "none"). A
                              folder still marked so is imported with that s as Strata's per-key input scalar
                              (encode(x) = enc(s x), decode(f) = dec(f) / s, see sae/base.py): the map SAELens'
                              fold_activation_norm_scaling_factor(s) gives (W_enc s, W_dec / s, b_dec / s).
    constant_norm_rescale     per token, x * sqrt(d_in) / ||x||, and the output divided by the same factor;
    layer_norm                per token, (x - mean(x)) / (std(x) + 1e-5), and the output * std + mean.
                              Both depend on each token's own statistics: not linear in x, so no change of
                              weights and no fixed scalar reproduces them. Refused, saying so.
reshape_activations "hook_z" (per-head attention z) is refused: Strata harvests flat activations only.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from activations.errors import StrataError

CFG, WEIGHTS, SPARSITY, SCALER = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "activation_scaler.json"
ARCHS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}   # SAELens architecture -> Strata arch
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
PER_TOKEN = {"constant_norm_rescale": "x * sqrt(d_in) / ||x|| with each token's own norm",
             "layer_norm": "(x - mean(x)) / (std(x) + 1e-5) with each token's own mean and std"}


@dataclass
class SAELensSAE:
    """What import needs: the Strata arch, sizes, the (folded) tensors, the input scalar, and what was done."""
    arch: str
    d_in: int
    d_sae: int
    k: int | None
    apply_b_dec_to_input: bool
    tensors: dict                       # W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec[, threshold], float32
    input_scale: float = 1.0            # Strata in/out scalar (expected_average_only_in), 1 otherwise
    log_sparsity: torch.Tensor | None = None
    hook_name: str = ""
    model_name: str = ""
    context_size: int = 0
    strata_key: str | None = None
    folded: list = field(default_factory=list)   # one line per transformation applied on import


def _fail(path: Path, problem: str, fix: str = "export it again with SAELens (SAE.save_model)") -> StrataError:
    return StrataError(f"{path}: {problem}; {fix}")


def _int(cfg: dict, key: str, path: Path, low: int = 1) -> int:
    if key not in cfg:
        raise _fail(path, f"has no {key}", f"add {key} (the SAE's value) to that file, or export it again with SAELens")
    v = cfg[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise _fail(path, f"has {key}={v!r}, not a whole number >= {low}", f"fix {key} in that file")
    return v


def _bool(cfg: dict, key: str, default: bool, path: Path) -> bool:
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise _fail(path, f"{key}={v!r} is not true or false", f"fix {key} in that file")
    return v


def read_config(folder: Path) -> dict:
    path = folder / CFG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"unreadable ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(cfg, dict):
        raise _fail(path, f"holds a JSON {type(cfg).__name__}, not the object of a SAELens config "
                          f"(architecture, d_in, d_sae, ...)")
    return cfg


def _tensors(folder: Path, arch: str, d_in: int, d_sae: int) -> dict:
    path = folder / WEIGHTS
    try:
        w = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise _fail(path, f"unreadable ({str(e).splitlines()[0][:100]})") from None
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    out = {}
    for name, shape in shapes.items():
        if name not in w:
            raise _fail(path, f"has no {name} tensor (a SAELens {arch} SAE has {', '.join(shapes)})")
        t = w[name]
        if not t.is_floating_point() or tuple(t.shape) != shape:
            raise _fail(path, f"{name} is {t.dtype} {tuple(t.shape)}, but cfg.json's d_in={d_in}, d_sae={d_sae} "
                              f"need a float tensor {shape}", "fix d_in/d_sae in cfg.json or export it again with SAELens")
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise _fail(path, f"{name} contains NaN/inf", "this SAE cannot be used; export a healthy checkpoint")
        out[name] = t
    return out


def _input_scale(folder: Path, norm: str) -> float:
    if norm in PER_TOKEN:
        raise _fail(folder / CFG, f"normalize_activations={norm!r} normalises each token by its own statistics "
                                  f"({PER_TOKEN[norm]}) and undoes it on the output; that is not a linear map, so it "
                                  f"cannot be folded into weights and Strata SAEs have no per-token step",
                    "use a SAELens SAE trained with none or expected_average_only_in")
    if norm != "expected_average_only_in":
        return 1.0
    path = folder / SCALER
    try:
        s = json.loads(path.read_text()).get("scaling_factor")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        s = None
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        raise _fail(folder / CFG, f"normalize_activations is expected_average_only_in, but no {SCALER} with a "
                                  f"positive scaling_factor lies beside it",
                    f"copy {SCALER} from the SAELens checkpoint folder, or fold it in SAELens first "
                    f"(sae.fold_activation_norm_scaling_factor)")
    return float(s)


def read_saelens(folder) -> SAELensSAE:
    """Check and read a SAELens SAE folder; StrataError naming the file and the fix for anything unusable."""
    folder = Path(folder)
    if not (folder / CFG).is_file() or not (folder / WEIGHTS).is_file():
        raise StrataError(f"{folder} is not a SAELens SAE folder (needs {CFG} and {WEIGHTS}); point at the folder "
                          f"SAELens saved (SAE.save_model)")
    cfg = read_config(folder)
    path = folder / CFG
    name = cfg.get("architecture", "standard")
    if name not in ARCHS:
        raise _fail(path, f"SAELens architecture {name!r} is not supported", "import a standard, topk or jumprelu SAE")
    arch = ARCHS[name]
    d_in, d_sae = _int(cfg, "d_in", path), _int(cfg, "d_sae", path)
    k = None
    if arch == "topk":
        k = _int(cfg, "k", path)
        if k >= d_sae:
            raise _fail(path, f"has k={k}, but a TopK SAE keeps fewer than d_sae={d_sae} latents",
                        "fix k in that file (1 to d_sae-1)")
    norm = cfg.get("normalize_activations", "none")
    if norm not in NORMALIZATIONS:
        raise _fail(path, f"normalize_activations={norm!r} is not one of {', '.join(NORMALIZATIONS)}",
                    "fix it in that file")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise _fail(path, f"reshape_activations={cfg['reshape_activations']!r} reads per-head activations, which "
                          f"Strata does not harvest", "import SAEs of flat activations (resid, mlp, attn_out)")
    apply_b_dec = _bool(cfg, "apply_b_dec_to_input", True, path)
    rescale = arch == "topk" and _bool(cfg, "rescale_acts_by_decoder_norm", False, path)
    scale = _input_scale(folder, norm)
    tensors = _tensors(folder, arch, d_in, d_sae)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    context = meta.get("context_size") or cfg.get("context_size") or 0
    sae = SAELensSAE(arch=arch, d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=apply_b_dec, tensors=tensors,
                     input_scale=scale, hook_name=str(meta.get("hook_name") or cfg.get("hook_name") or ""),
                     model_name=str(meta.get("model_name") or cfg.get("model_name") or ""),
                     context_size=context if isinstance(context, int) and context > 0 else 0,
                     strata_key=meta.get("strata_key") if isinstance(meta.get("strata_key"), str) else None,
                     log_sparsity=_sparsity(folder / SPARSITY, d_sae) if (folder / SPARSITY).is_file() else None)
    if rescale:
        fold_decoder_norms(sae.tensors)
        sae.folded.append("rescale_acts_by_decoder_norm: decoder row norms n folded in (W_enc*n, b_enc*n, W_dec/n)")
    if norm == "expected_average_only_in":
        sae.folded.append(f"normalize_activations expected_average_only_in: scaling_factor {scale!r} from {SCALER} "
                          f"as the input scalar (in_scales/out_scales)")
    return sae


@torch.no_grad()
def fold_decoder_norms(t: dict) -> None:
    """TopK with rescale_acts_by_decoder_norm -> the plain TopK SAE computing the same map (in place)."""
    n = t["W_dec"].double().norm(dim=1)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    t["W_enc"] = (t["W_enc"].double() * n).float()
    t["b_enc"] = (t["b_enc"].double() * n).float()
    t["W_dec"] = (t["W_dec"].double() / safe[:, None]).float()


def _sparsity(path: Path, d_sae: int) -> torch.Tensor:
    try:
        s = load_file(str(path)).get("sparsity")
    except (OSError, SafetensorError) as e:
        raise _fail(path, f"unreadable ({str(e).splitlines()[0][:100]})", "remove it (it is optional) or export again") from None
    if s is None or tuple(s.shape) != (d_sae,) or not s.is_floating_point():
        raise _fail(path, f"needs a float tensor 'sparsity' of shape ({d_sae},)", "remove it (it is optional) or export again")
    return s.double()
