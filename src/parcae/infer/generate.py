"""Sampling from a Parcae model at a chosen test-time depth.

This first version re-runs the whole (cropped) context for each new token; the KV-cached path replaces
the inner forward without changing this interface.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.parcae import Parcae


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Next token ids [B] from last-position logits [B, V]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Parcae,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    num_steps: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_id: int | None = None,
    seed: int | None = None,
    vocab_limit: int | None = None,
) -> Tensor:
    """Append up to `max_new_tokens` sampled tokens to `input_ids` [B, L]; returns [B, L + new].

    `vocab_limit`: ids at or above it are never sampled (a model's vocabulary is often padded beyond
    its tokenizer's, e.g. 320 rows for the 259-token byte tokenizer).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens = input_ids.to(device)
    window = model.config.max_seq_len
    try:
        for _ in range(max_new_tokens):
            context = tokens[:, -window:]
            logits = model(context, num_steps=num_steps if model.config.is_looped else None).logits[:, -1]
            if vocab_limit is not None:
                logits[:, vocab_limit:] = float("-inf")
            next_ids = sample_next(logits, temperature, top_k, generator)
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            if stop_id is not None and bool((next_ids == stop_id).all()):
                break
    finally:
        model.train(was_training)
    return tokens
