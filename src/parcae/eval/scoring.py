"""Scoring token sequences at a fixed test-time depth: per-token losses and greedy agreement, batched.

The loss sweep, the CORE harness and the lm-eval adapter all score through `token_scores`, so a token is
scored the same way everywhere: fixed depth T (never a sampled one), h₀ from `state_seed`, cross entropy
over the model's full vocabulary, and "greedy" meaning the argmax over the tokenizer's ids (`vocab_limit`;
a model's vocabulary is often padded beyond its tokenizer's, and greedy decoding never emits those ids).

A *row* is one sequence to score: its tokens and the index of its first scored token. Rows are right-padded
into batches; the labels of padding and of unscored (context) positions are IGNORE_INDEX. Attention is
causal and the model seeds h₀ per position (the same vector for every row), so neither padding nor a row's
batch neighbours change its scores: batched and one-at-a-time scoring agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.parcae import IGNORE_INDEX

# Logit elements converted to fp32 at once when computing per-token losses (32 Mi floats = 128 MiB).
_LOGIT_CHUNK_ELEMENTS = 1 << 25
T = TypeVar("T")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (fixed depth, seeded h₀) for the block; the previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_depths(depths: Sequence[int]) -> list[int]:
    """The depths as a list; ValueError unless there is at least one and each is a positive integer."""
    depths = list(depths)
    if not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
        raise ValueError(f"depths must be positive integers, got {depths!r}.")
    return depths


@dataclass(frozen=True)
class TokenScores:
    nll: Tensor  # [B, L] float32 nats per target; 0 where the label is IGNORE_INDEX
    greedy: Tensor  # [B, L] bool: the target is the argmax below vocab_limit (False where ignored)
    metrics: dict[str, Any] = field(default_factory=dict)  # the model's loop telemetry


@torch.inference_mode()
def token_scores(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    num_steps: int | None = None,
    state_seed: int = 0,
    vocab_limit: int | None = None,
) -> TokenScores:
    """Per-token losses of `labels` given `inputs` ([B, L] each) at depth `num_steps` (None: μ_rec).

    The model must already be in eval mode (see `evaluating`); a fixed-depth model ignores `num_steps`.
    """
    device = model_device(model)
    inputs, labels = inputs.to(device), labels.to(device)
    steps = num_steps if model.config.is_looped else None
    out = model(inputs, num_steps=steps, state_seed=state_seed)
    logits = out.logits
    batch, length, vocab = logits.shape
    nll = torch.zeros(batch, length, dtype=torch.float32, device=device)
    greedy = torch.zeros(batch, length, dtype=torch.bool, device=device)
    rows = max(1, _LOGIT_CHUNK_ELEMENTS // max(1, length * vocab))
    for start in range(0, batch, rows):
        chunk, targets = logits[start : start + rows].float(), labels[start : start + rows]
        losses = F.cross_entropy(chunk.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        nll[start : start + rows] = losses.view_as(targets)
        best = chunk[..., :vocab_limit].argmax(dim=-1) if vocab_limit else chunk.argmax(dim=-1)
        greedy[start : start + rows] = (best == targets) & (targets != IGNORE_INDEX)
    return TokenScores(nll=nll, greedy=greedy, metrics=out.metrics)


# ---------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """Tokens to feed (all but the last) and score (from index `start` on, `start` ≥ 1)."""

    tokens: np.ndarray  # int64
    start: int

    @property
    def scored(self) -> int:
        return len(self.tokens) - self.start


@dataclass(frozen=True)
class RowScore:
    nll: float  # summed nats over the scored tokens
    count: int  # scored tokens
    greedy: bool  # every scored token is the greedy (argmax) choice

    @property
    def mean_nll(self) -> float:
        return self.nll / self.count


def make_row(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[Row, bool]:
    """`context + continuation`, left-truncated to `max_len + 1` tokens (so the model sees ≤ `max_len`).

    Returns the row and whether anything was cut. If the continuation alone is longer than the window,
    its head is cut too and only its last `max_len` tokens are scored.
    """
    if not context:
        raise ValueError("a row needs at least one context token (e.g. BOS) to condition on.")
    if not continuation:
        raise ValueError("a row needs at least one continuation token to score.")
    full = np.asarray([*context, *continuation], dtype=np.int64)
    kept = full[-(max_len + 1) :]
    return Row(tokens=kept, start=max(1, len(kept) - len(continuation))), len(kept) < len(full)


def score_rows(
    model: nn.Module,
    rows: Sequence[Row],
    *,
    num_steps: int | None,
    state_seed: int,
    pad_id: int,
    vocab_limit: int | None = None,
) -> list[RowScore]:
    """Score `rows` in one forward pass (right-padded to the longest)."""
    width = max(len(row.tokens) for row in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens = torch.from_numpy(row.tokens)
        inputs[i, : len(tokens) - 1] = tokens[:-1]
        labels[i, row.start - 1 : len(tokens) - 1] = tokens[row.start :]
    scores = token_scores(model, inputs, labels, num_steps=num_steps, state_seed=state_seed, vocab_limit=vocab_limit)
    scored = labels != IGNORE_INDEX
    nll = scores.nll.sum(dim=1).tolist()
    counts = scored.sum(dim=1).tolist()
    greedy = (scores.greedy == scored).all(dim=1).tolist()
    return [RowScore(nll=n, count=c, greedy=g) for n, c, g in zip(nll, counts, greedy, strict=True)]


def pack_groups(groups: Sequence[Sequence[Row]], max_rows: int) -> list[list[int]]:
    """Batches of group indices: whole groups, longest first, at most `max_rows` rows per batch.

    Sorting by length keeps padding small; a group larger than `max_rows` gets a batch of its own
    (the options of one example are always scored together).
    """
    order = sorted(range(len(groups)), key=lambda g: -max((len(r.tokens) for r in groups[g]), default=0))
    batches: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for g in order:
        size = len(groups[g])
        if current and rows + size > max_rows:
            batches.append(current)
            current, rows = [], 0
        current.append(g)
        rows += size
    if current:
        batches.append(current)
    return batches


def score_groups(
    model: nn.Module,
    groups: Sequence[Sequence[Row]],
    *,
    batch_size: int,
    num_steps: int | None,
    state_seed: int,
    pad_id: int,
    vocab_limit: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[RowScore]]:
    """Scores of every row of every group, in the groups' order; batches of ≤ `batch_size` rows.

    `on_batch(rows)` is called after each batch (for progress bars).
    """
    results: list[list[RowScore]] = [[] for _ in groups]
    with evaluating(model):
        for batch in pack_groups(groups, batch_size):
            rows = [row for g in batch for row in groups[g]]
            scores = iter(score_rows(model, rows, num_steps=num_steps, state_seed=state_seed, pad_id=pad_id,
                                     vocab_limit=vocab_limit))  # fmt: skip
            for g in batch:
                results[g] = [next(scores) for _ in groups[g]]
            if on_batch is not None:
                on_batch(len(rows))
    return results
