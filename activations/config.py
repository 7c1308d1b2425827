"""HarvestConfig: everything `strata harvest` needs. The defaults harvest the embedded SmolLM2-135M on the
built-in offline corpus (CPython's documentation text)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Ge, Gt

from activations.config_types import LAYER_SPEC, SITE_LIST


def option(default, help_: str, **meta):
    """A config field with a default and its CLI help (every stage's config dataclass uses this).
    Its type annotation says what values are valid (choices as Literal, constraints as pydantic types)."""
    return field(default=default, metadata={"help": help_, **meta})


def identity_differences(saved: dict, now: dict, defaults: dict) -> list[str]:
    """'field: old -> new' for each field where the identity a run was started with differs from this command's.
    A field the saved identity lacks (added by a later Strata) counts as its default, which is what that run did."""
    return [f"{k}: {saved.get(k, defaults.get(k))!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k, defaults.get(k)) != now.get(k)]


@dataclass
class HarvestConfig:
    run_dir: str = option("runs/default", "run directory to write")
    model: str = option("smollm2-135m", "hub id, local folder, .gguf file, or 'smollm2-135m' (embedded, offline)")
    dataset: str | None = option(None, "Hugging Face dataset name (streamed); default: the built-in offline corpus")
    dataset_config: str | None = option(None, "dataset config name")
    split: str = option("train", "dataset split")
    text_column: str = option("text", "column holding the text (datasets, .jsonl, .parquet)")
    data: str | None = option(None, "local .txt/.jsonl/.parquet file or folder of them")
    sites: Annotated[str, SITE_LIST] = option("resid", "comma list of hook sites: resid, mlp_in, mlp_out, attn_out")
    layers: Annotated[str, LAYER_SPEC] = option("all", "layers: 'all' or comma list of ints and ranges a-b[:step] (b inclusive)")
    context: Annotated[int, Gt(0)] = option(128, "tokens per context (documents are packed)")
    batch_contexts: Annotated[int, Gt(0)] = option(8, "contexts per forward pass")
    shard_tokens: Annotated[int, Gt(0)] = option(16384, "tokens per shard (rounded to whole forward batches)")
    max_tokens: Annotated[int, Ge(0)] = option(200_000, "token budget (0 = the whole corpus)")
    dtype: Literal["float16", "bfloat16"] = option("float16", "storage dtype")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "dtype the model runs in: auto (bf16 where a one-off probe finds its matmuls >= 1.5x faster than fp32 "
                "on this machine), fp32, bf16; storage stays --dtype")
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "dtype the model runs in, overriding --precision (auto: as --precision decides)")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    resume: bool = option(False, "continue an interrupted run after its last complete shard")
    overwrite: bool = option(False, "delete an existing run in run_dir first")
    queue_batches: Annotated[int, Gt(0)] = option(4, "forward batches buffered between the model and the writer (bounds memory)")
    progress: bool = option(True, "show a progress bar")

    def identity(self) -> dict:
        """Fields that define what a run contains: a resume must match them exactly. `precision` is not one (auto
        may resolve differently on another machine; the manifest records what each harvest used), nor
        `model_dtype` unless given."""
        keep = ("model", "dataset", "dataset_config", "split", "text_column", "data", "sites", "layers",
                "context", "batch_contexts", "shard_tokens", "max_tokens", "dtype")
        return {k: getattr(self, k) for k in keep} | ({} if self.model_dtype == "auto" else {"model_dtype": self.model_dtype})
