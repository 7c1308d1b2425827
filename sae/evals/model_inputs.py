"""What the suites that run the model on new text (absorption, probing) share: which SAE input each SAE is
scored on, loading the run's model once, and one forward pass per batch of texts for every key at once.

Scored inputs: a per-layer SAE or a transcoder is scored on its input key; a multi-layer SAE on each of its
input keys separately (encoded with that key's normalisation), so its metrics are per layer of its input; a
crosscoder reads every key at once (one latent space over the concatenation) and has no per-layer input, so the
model-driven suites skip it with a note.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from activations.errors import StrataError
from activations.synth import is_synthetic


def scored_inputs(saes: dict, suite: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({sae_id: keys it is scored on}, {sae_id: why the suite skips it})."""
    keys, skipped = {}, {}
    for sid, sae in saes.items():
        mode = sae.cfg.mode
        if mode == "crosscoder":
            skipped[sid] = f"{suite} scores one input key at a time; a crosscoder reads all its keys at once"
        elif mode == "multilayer":
            keys[sid] = list(sae.cfg.in_keys)
        else:
            keys[sid] = [sae.cfg.in_keys[0]]
    return keys, skipped


def encode_at(sae, x_ND: torch.Tensor, key: str) -> torch.Tensor:
    """Latents [N, F] (float32) of raw activations at `key`, with that key's normalisation."""
    kw = {"key": key} if sae.cfg.mode == "multilayer" else {}
    return sae.encode(x_ND.to(sae.W_dec.device), **kw).float()


def check_model(run, suite: str) -> str:
    """The id of the model the run was harvested from; StrataError for a run without one."""
    model_id = str((run.manifest.model or {}).get("id") or "")
    if not model_id or is_synthetic(run.manifest.model):
        raise StrataError(f"the {suite} suite runs the model the run was harvested from, and this run has none "
                          f"(synthetic activations); leave absorption and probing out of --suite for it")
    return model_id


def load_run_model(run, device, dtype, suite: str):
    """The model the run was harvested from (activations.model.load_model)."""
    from activations.model import load_model

    return load_model(check_model(run, suite), device, dtype)


def token_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    """The ids the harvest would give `text` at the start of a context: BOS (when the tokenizer uses one), then
    the text's tokens, at most `max_tokens` in all."""
    from activations.tokens import wants_bos

    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if wants_bos(tokenizer) else []
    return (bos + list(ids))[:max_tokens]


def forward_batches(lm, keys: list[str], seqs: list[list[int]], batch: int, device) -> Iterator[tuple[int, dict, torch.Tensor]]:
    """(first index, {key: activations [B, T, d] float32}, mask [B, T]) for batches of token sequences, right
    padded (a causal model's real tokens never see the padding). One forward per batch covers every key."""
    from activations.hooks import capture

    pad = lm.tokenizer.pad_token_id or 0
    for s in range(0, len(seqs), batch):
        chunk = seqs[s:s + batch]
        T = max(len(q) for q in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.bool)
        for i, q in enumerate(chunk):
            ids[i, :len(q)] = torch.tensor(q)
            mask[i, :len(q)] = True
        acts = capture(lm.model, keys, ids.to(device))
        yield s, {k: v.float() for k, v in acts.items()}, mask.to(device)
