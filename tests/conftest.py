"""Shared fixtures: tiny random-weight models built from transformers configs (with a small BPE tokenizer
trained in-process on the built-in corpus), and tiny harvested runs made with them."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Tiny SAEs: a second thread only adds synchronisation (and stalls badly on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright's `page` opens Debian's chromium (tests/test_dashboard_support.py finds it)."""
    from test_dashboard_support import chromium_launch_args

    return chromium_launch_args(browser_type_launch_args)


def make_tokenizer(vocab_size: int = 384, bos: bool = True):
    """A byte-level BPE tokenizer trained on the first built-in documents (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from activations.corpus import builtin_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(itertools.islice(builtin_documents(), 20), trainer)
    if bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")


def make_model(arch: str, vocab_size: int, n_layers: int = 3, d: int = 32):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return tf.LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=d, n_layer=n_layers, n_head=4, n_positions=256,
                            bos_token_id=0, eos_token_id=1)
        return tf.GPT2LMHeadModel(cfg)
    raise ValueError(arch)


def save_tiny_model(folder: Path, arch: str, n_layers: int = 3, d: int = 32) -> Path:
    tok = make_tokenizer(bos=(arch == "llama"))
    model = make_model(arch, len(tok), n_layers, d)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def harvest_tiny(run_dir: Path, model_dir: Path, **overrides):
    from activations.config import HarvestConfig
    from activations.harvest import harvest

    opts = dict(run_dir=str(run_dir), model=str(model_dir), sites="resid,mlp_in,mlp_out", layers="all", context=32,
                batch_contexts=4, shard_tokens=1024, max_tokens=6144, progress=False)
    opts.update(overrides)
    return harvest(HarvestConfig(**opts))


def torchrun_strata(verb: str, port: int, *args, **opts) -> None:
    """`strata VERB ARGS --opt=value ...` under `torchrun --nproc-per-node 2` (gloo, one thread a process, master
    port `port`); it must exit 0."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), "-m", "strata.cli", verb, *map(str, args), "--progress", "false", *flags],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_llama) -> Path:
    """A harvested run of the tiny Llama: resid 0-3, mlp_in/mlp_out 0-2, 6144 tokens in 6 shards of 1024."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    harvest_tiny(run, tiny_llama)
    return run


@pytest.fixture
def run(tmp_path, tiny_run) -> Path:
    """A private copy of the shared tiny harvest (resid 0-3, mlp_in/mlp_out 0-2; 6 shards of 1024 tokens, d=32),
    without anything made from it."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("train", "index", "share", "sweeps", ".locks",
                                                                   ".strata.lock"))
    return dest


@pytest.fixture(scope="session")
def analyzed_run(tmp_path_factory, tiny_run) -> Path:
    """(dashboard tests) a copy of tiny_run with a trained TopK bank and multi-layer SAE, both analysed."""
    from test_dashboard_support import build_analyzed_run

    return build_analyzed_run(tmp_path_factory.mktemp("analyzed"), tiny_run)


@pytest.fixture(scope="session")
def attn_run(tmp_path_factory, tiny_llama) -> Path:
    """A harvested run of the tiny Llama at attn_out 0-2 (2048 tokens in 4 shards) with a per-layer TopK bank
    (`attn-layer`) and a multi-layer SAE (`attn-multi`) trained on it, both analysed (heads attributed)."""
    from sae.analysis.analyze import AnalyzeConfig, analyze
    from sae.train import train
    from sae.train_config import TrainConfig

    run = tmp_path_factory.mktemp("runs") / "attn"
    harvest_tiny(run, tiny_llama, sites="attn_out", max_tokens=2048, shard_tokens=512)
    for mode, name in (("layer", "attn-layer"), ("multilayer", "attn-multi")):
        train(TrainConfig(run_dir=str(run), name=name, mode=mode,
                          sites="attn_out", layers="all", expansion=2, k=4, batch_size=256, max_tokens=2048,
                          progress=False, wandb_mode="disabled", device="cpu"))
    analyze(AnalyzeConfig(run_dir=str(run), progress=False, device="cpu", precision="fp32"))  # shares to 1e-4
    return run


@pytest.fixture(scope="session")
def smollm2_mlp_run(tmp_path_factory) -> Path:
    """(slow tests) the real packaged SmolLM2 harvested at mlp_in/mlp_out 0-2, 2,048 tokens of 32-token contexts;
    each test trains its own name on it (transcoders, a CLT)."""
    from strata.cli import main

    run = tmp_path_factory.mktemp("smol") / "smol"
    assert main(["harvest", str(run), "--layers", "0-2", "--sites", "mlp_in,mlp_out", "--context", "32",
                 "--max-tokens", "2048", "--shard-tokens", "1024", "--progress", "false"]) == 0
    return run
