"""HarvestConfig: everything `strata harvest` needs. The defaults harvest the embedded SmolLM2-135M on the
built-in offline corpus (CPython's documentation text)."""
from __future__ import annotations

from dataclasses import dataclass, field


def _f(default, help_: str):
    return field(default=default, metadata={"help": help_})


@dataclass
class HarvestConfig:
    run_dir: str = _f("runs/default", "run directory to write")
    model: str = _f("smollm2-135m", "hub id, local folder, .gguf file, or 'smollm2-135m' (embedded, offline)")
    dataset: str | None = _f(None, "Hugging Face dataset name (streamed); default: the built-in offline corpus")
    dataset_config: str | None = _f(None, "dataset config name")
    split: str = _f("train", "dataset split")
    text_column: str = _f("text", "column holding the text (datasets, .jsonl, .parquet)")
    data: str | None = _f(None, "local .txt/.jsonl/.parquet file or folder of them")
    sites: str = _f("resid", "comma list of hook sites: resid, mlp_in, mlp_out, attn_out")
    layers: str = _f("all", "layers: 'all' or comma list of ints and ranges a-b[:step] (b inclusive)")
    context: int = _f(128, "tokens per context (documents are packed)")
    batch_contexts: int = _f(8, "contexts per forward pass")
    shard_tokens: int = _f(16384, "tokens per shard (rounded to whole forward batches)")
    max_tokens: int = _f(200_000, "token budget (0 = the whole corpus)")
    dtype: str = _f("float16", "storage dtype: float16 or bfloat16")
    model_dtype: str = _f("float32", "dtype the model runs in: float32, bfloat16, float16")
    device: str = _f("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    resume: bool = _f(False, "continue an interrupted run after its last complete shard")
    overwrite: bool = _f(False, "delete an existing run in run_dir first")
    queue_batches: int = _f(4, "forward batches buffered between the model and the writer (bounds memory)")
    progress: bool = _f(True, "show a progress bar")

    def identity(self) -> dict:
        """Fields that define what a run contains: a resume must match them exactly."""
        keep = ("model", "dataset", "dataset_config", "split", "text_column", "data", "sites", "layers",
                "context", "batch_contexts", "shard_tokens", "max_tokens", "dtype", "model_dtype")
        return {k: getattr(self, k) for k in keep}
