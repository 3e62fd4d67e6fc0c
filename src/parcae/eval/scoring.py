"""Batched scoring at a fixed depth T: per-token losses, greedy agreement. Causal attention and a per-position h₀ make
scores independent of padding and neighbours; shared contexts run once through the KV cache (equal up to rounding)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.parcae import IGNORE_INDEX, Parcae

# Logit elements converted to fp32 at once for per-token losses (128 MiB).
_LOGIT_CHUNK_ELEMENTS = 1 << 25
# KV-cache bytes one batch of shared prompts may fill (rows × columns × bytes per cached token). A looped model
# caches every iteration's K/V, so a batch that fits at T = 4 may not at T = 32: such batches are split.
_KV_CACHE_BYTES = 1 << 32


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (fixed depth, seeded h₀) for the block; the previous mode is restored afterwards."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def seed_changes_h0(config: Any) -> bool:
    """Whether `state_seed` changes a model's outputs: only a looped model with a random h₀ depends on it."""
    return bool(config.is_looped and config.state_init != "zero")


def check_integers(values: Sequence[int], what: str, least: int = 1) -> list[int]:
    """`values` as a list; ValueError unless it is non-empty and all are integers ≥ `least` (1 or 0)."""
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < least for v in values):
        raise ValueError(f"{what} must be {'positive' if least else 'non-negative'} integers, got {values!r}.")
    return values


def logit_scores(logits: Tensor, labels: Tensor, vocab_limit: int | None) -> tuple[Tensor, Tensor]:
    """(nll, greedy) [B, L] of `labels` under `logits` [B, L, V], in fp32: nats per target (0 where ignored) and
    whether it is the argmax below `vocab_limit` (greedy decoding never emits a padded vocabulary's extra ids)."""
    batch, length, vocab = logits.shape
    nll = torch.zeros(batch, length, dtype=torch.float32, device=logits.device)
    greedy = torch.zeros(batch, length, dtype=torch.bool, device=logits.device)
    rows = max(1, _LOGIT_CHUNK_ELEMENTS // max(1, length * vocab))
    for start in range(0, batch, rows):
        chunk, targets = logits[start : start + rows].float(), labels[start : start + rows]
        losses = F.cross_entropy(chunk.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        nll[start : start + rows] = losses.view_as(targets)
        best = chunk[..., :vocab_limit].argmax(dim=-1) if vocab_limit else chunk.argmax(dim=-1)
        greedy[start : start + rows] = (best == targets) & (targets != IGNORE_INDEX)
    return nll, greedy


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
    """(`context + continuation` left-truncated to `max_len + 1` tokens, whether anything was cut)."""
    if not context:
        raise ValueError("a row needs at least one context token (e.g. BOS) to condition on.")
    if not continuation:
        raise ValueError("a row needs at least one continuation token to score.")
    full = np.asarray([*context, *continuation], dtype=np.int64)
    kept = full[-(max_len + 1) :]
    return Row(tokens=kept, start=max(1, len(kept) - len(continuation))), len(kept) < len(full)


@torch.inference_mode()
def score_rows(
    model: nn.Module,
    rows: Sequence[Row],
    *,
    num_steps: int | None,
    state_seed: int,
    pad_id: int,
    vocab_limit: int | None = None,
) -> list[RowScore]:
    """Score `rows` in one forward pass (right-padded to the longest); the model must be in eval mode."""
    width = max(len(row.tokens) for row in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens = torch.from_numpy(row.tokens)
        inputs[i, : len(tokens) - 1] = tokens[:-1]
        labels[i, row.start - 1 : len(tokens) - 1] = tokens[row.start :]
    steps = num_steps if model.config.is_looped else None  # a fixed-depth model has no depth
    logits = model(inputs.to(next(model.parameters()).device), num_steps=steps, state_seed=state_seed).logits
    return _row_scores(logits, labels, vocab_limit)


def _row_scores(logits: Tensor, labels: Tensor, vocab_limit: int | None) -> list[RowScore]:
    labels = labels.to(logits.device)
    nll, greedy = logit_scores(logits, labels, vocab_limit)
    scored = labels != IGNORE_INDEX
    totals, counts = nll.sum(dim=1).tolist(), scored.sum(dim=1).tolist()
    all_greedy = (greedy == scored).all(dim=1).tolist()
    return [RowScore(nll=n, count=c, greedy=g) for n, c, g in zip(totals, counts, all_greedy, strict=True)]


@dataclass(frozen=True)
class SharedPrompt:
    """Rows that feed the same context tokens: the context runs once, then each row's continuation."""

    context: np.ndarray  # int64, the rows' common tokens[: start]
    continuations: tuple[np.ndarray, ...]  # each row's tokens[start :] (≥ 1 token, all scored)
    rows: tuple[int, ...]  # the rows' indices in the list given to `share_prompts`

    @property
    def fed(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)

    @property
    def columns(self) -> int:
        return len(self.context) + max(len(c) for c in self.continuations) - 1


def share_prompts(rows: Sequence[Row]) -> list[SharedPrompt]:
    """`rows` grouped by identical context tokens (the split `make_row` chose), in order of first appearance."""
    heads = [np.asarray(row.tokens[: row.start], dtype=np.int64) for row in rows]
    tails = [np.asarray(row.tokens[row.start :], dtype=np.int64) for row in rows]
    members: dict[bytes, list[int]] = {}
    for i, head in enumerate(heads):
        members.setdefault(head.tobytes(), []).append(i)
    return [SharedPrompt(heads[m[0]], tuple(tails[i] for i in m), tuple(m)) for m in members.values()]


@torch.inference_mode()
def score_shared(
    model: Parcae,
    prompts: Sequence[SharedPrompt],
    *,
    num_steps: int | None,
    state_seed: int,
    pad_id: int,
    vocab_limit: int | None = None,
) -> list[list[RowScore]]:
    """Scores of every continuation of every prompt (model in eval mode): one cached forward over the contexts,
    left-padded (the cache masks it) so that all continuations start in one column, one over the continuations."""
    device = next(model.parameters()).device
    steps = num_steps if model.config.is_looped else None
    width = max(len(p.context) for p in prompts)
    contexts = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    real = torch.arange(width) >= torch.tensor([width - len(p.context) for p in prompts]).unsqueeze(1)  # not padding
    for i, prompt in enumerate(prompts):
        contexts[i, width - len(prompt.context) :] = torch.from_numpy(prompt.context)
    continuations = [torch.from_numpy(c) for p in prompts for c in p.continuations]
    span = max(len(c) for c in continuations)  # label columns; the last label is never fed
    labels = torch.full((len(continuations), span), IGNORE_INDEX, dtype=torch.long)
    inputs = torch.full((len(continuations), span - 1), pad_id, dtype=torch.long)
    for r, tokens in enumerate(continuations):
        labels[r, : len(tokens)] = tokens
        inputs[r, : len(tokens) - 1] = tokens[:-1]
    cache = model.new_cache(len(prompts), width + span - 1, max_steps=steps)  # room for the continuations
    run = {"num_steps": steps, "state_seed": state_seed}
    out = model.forward_cached(contexts.to(device), cache, attention_mask=real.to(device), last_logits_only=True, **run)
    owners = torch.tensor([i for i, p in enumerate(prompts) for _ in p.continuations], device=device)
    logits = [out.logits[:, -1][owners, None]]  # position 0: the first continuation token, predicted by the context
    if span > 1:
        logits.append(model.forward_cached(inputs.to(device), cache.select_rows(owners), **run).logits)
    scores = iter(_row_scores(torch.cat(logits, dim=1), labels, vocab_limit))
    return [[next(scores) for _ in p.continuations] for p in prompts]


def _greedy_batches(order: Sequence[int], fits: Callable[[list[int]], bool]) -> list[list[int]]:
    """Consecutive runs of `order`, each as long as `fits` allows (an item that fits nowhere goes alone)."""
    batches: list[list[int]] = []
    for item in order:
        if batches and fits([*batches[-1], item]):
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def pack_groups(groups: Sequence[Sequence[Row]], max_rows: int) -> list[list[int]]:
    """Batches of whole groups (indices), longest first, of ≤ `max_rows` rows unless one group alone has more."""
    order = sorted(range(len(groups)), key=lambda g: -max((len(r.tokens) for r in groups[g]), default=0))
    return _greedy_batches(order, lambda batch: sum(len(groups[g]) for g in batch) <= max_rows)


def pack_prompts(
    prompts: Sequence[SharedPrompt], max_rows: int, max_columns: int, bytes_per_token: float
) -> list[list[int]]:
    """Prompt indices batched longest context first within `max_rows` rows, `max_columns` and `_KV_CACHE_BYTES`."""
    order = sorted(range(len(prompts)), key=lambda p: -len(prompts[p].context))

    def fits(batch: list[int]) -> bool:
        rows = sum(len(prompts[p].continuations) for p in batch)
        width = max(len(prompts[p].context) for p in batch)
        columns = width + max(prompts[p].columns - len(prompts[p].context) for p in batch)
        return rows <= max_rows and columns <= max_columns and rows * columns * bytes_per_token <= _KV_CACHE_BYTES

    return _greedy_batches(order, fits)


def _units(
    model: nn.Module, groups: Sequence[Sequence[Row]], share: bool
) -> tuple[list[Row], list[list[int]], list[SharedPrompt]]:
    """How `score_groups` scores `groups`: their rows, units of row indices for one-pass batches, shared prompts."""
    rows = [row for group in groups for row in group]
    if share and isinstance(model, Parcae):
        prompts = share_prompts(rows)
        return rows, [list(p.rows) for p in prompts if len(p.rows) == 1], [p for p in prompts if len(p.rows) > 1]
    offsets = np.cumsum([0, *(len(group) for group in groups)]).tolist()
    return rows, [list(range(offsets[g], offsets[g + 1])) for g in range(len(groups))], []


def tokens_fed(model: nn.Module, groups: Sequence[Sequence[Row]], *, share: bool = True) -> int:
    """Tokens `score_groups` feeds for `groups` (no padding): the sum it reports to `on_tokens`, known in advance."""
    rows, plain, shared = _units(model, groups, share)
    return sum(len(rows[i].tokens) - 1 for unit in plain for i in unit) + sum(p.fed for p in shared)


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
    on_tokens: Callable[[int], None] | None = None,
    share: bool = True,
) -> list[list[RowScore]]:
    """Scores of every row of every group, in batches of ≤ `batch_size` rows. With `share` and a `Parcae`, rows with
    a common context go through `score_shared`. After each batch: `on_batch(rows)` and `on_tokens(tokens fed)`."""
    rows, plain, shared = _units(model, groups, share)
    scores: dict[int, RowScore] = {}  # by index in `rows`
    common = {"num_steps": num_steps, "state_seed": state_seed, "pad_id": pad_id, "vocab_limit": vocab_limit}

    def report(count: int, fed: int) -> None:
        if on_batch is not None:
            on_batch(count)
        if on_tokens is not None:
            on_tokens(fed)

    with evaluating(model):
        for batch in pack_groups([[rows[i] for i in unit] for unit in plain], batch_size):
            members = [i for unit in batch for i in plain[unit]]
            scores.update(zip(members, score_rows(model, [rows[i] for i in members], **common), strict=True))
            report(len(members), sum(len(rows[i].tokens) - 1 for i in members))
        if shared:
            bytes_per_token = model.new_cache(1, 1, max_steps=num_steps).bytes_per_token()
            for batch in pack_prompts(shared, batch_size, model.config.max_seq_len, bytes_per_token):
                chosen = [shared[p] for p in batch]
                for prompt, row_scores in zip(chosen, score_shared(model, chosen, **common), strict=True):
                    scores.update(zip(prompt.rows, row_scores, strict=True))
                report(sum(len(p.rows) for p in chosen), sum(p.fed for p in chosen))
    ordered = iter([scores[i] for i in range(len(rows))])
    return [[next(ordered) for _ in group] for group in groups]
