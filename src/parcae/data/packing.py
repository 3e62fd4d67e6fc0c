"""BOS-aligned buffered best-fit packing of documents into fixed-length training rows.

Each row holds `seq_len + 1` tokens; a batch is (inputs = row[:-1], labels = row[1:]).

1. Partition: document `i` belongs to rank `i % world_size` (`rank_documents`), so no document is read twice or
   skipped across ranks. Epoch `e` visits the rank's documents in `np.random.default_rng((seed, e, rank))`'s
   permutation (store order with `shuffle=False`).
2. Buffer: before every pick the pending pieces `(doc, start, end)`, sorted by length, are topped up to
   `buffer_size` from the current epoch only; the next epoch starts once this one is used up (permutation
   exhausted, buffer empty). So within an epoch every token is placed exactly once, however few or long the
   documents. A row still being filled when an epoch runs out continues with the next (`loop=False`: the stream
   ends there).
3. Best fit: a row takes the largest piece that fits the space left; when none fits, the largest is cut to fill
   the row exactly and its remainder returns to the buffer (a "crop"; tokens placed from such continuations count
   as "carried"). No token is dropped, and every document's first piece opens with BOS.
4. End: padding (`pad_id` in inputs, -100 in labels) appears only when a `loop=False` stream runs out: the last
   row is padded, the last batch may be short (never an all-padding row), then `StopIteration`.

`state_dict` is plain JSON (epoch, permutation position, buffer, statistics); loading it into a fresh packer over
the same store reproduces the uninterrupted stream of batches exactly.
"""

from __future__ import annotations

import itertools
import sys
from bisect import bisect_right, insort
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .shards import TokenStore

IGNORE_INDEX = -100
STATE_VERSION = 1
_STAT_KEYS = ("rows", "tokens", "padding_tokens", "crops", "carried_tokens", "epochs")
_CONFIG_KEYS = ("seq_len", "batch_size", "buffer_size", "seed", "rank", "world_size", "shuffle", "loop")
# Must match for a state to resume: they fix what the saved positions and pieces mean.
_STATE_KEYS = ("num_docs", "seq_len", "seed", "rank", "world_size", "shuffle")


def rank_documents(num_docs: int, rank: int, world_size: int) -> range:
    """Indices of the documents owned by `rank`: every `world_size`-th one, starting at `rank`."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size; got rank {rank}, world_size {world_size}.")
    return range(rank, num_docs, world_size)


class BestFitPacker:
    """Packs a `TokenStore` into (inputs, labels) int64 batches of shape [batch_size, seq_len]."""

    def __init__(
        self,
        store: TokenStore,
        seq_len: int,
        batch_size: int,
        *,
        buffer_size: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        loop: bool = True,
        pad_id: int,
    ) -> None:
        if seq_len < 1 or batch_size < 1 or buffer_size < 1:
            raise ValueError(
                f"seq_len, batch_size and buffer_size must be positive; got {seq_len}, {batch_size}, {buffer_size}."
            )
        self.store = store
        self.seq_len, self.batch_size, self.buffer_size = seq_len, batch_size, buffer_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.loop, self.pad_id = shuffle, loop, pad_id
        self._docs = rank_documents(store.num_docs, rank, world_size)
        self._lengths = np.asarray(store.doc_lengths, dtype=np.int64)
        if loop and int(self._lengths[self._docs.start :: world_size].sum()) == 0:  # would never yield a row
            raise ValueError(f"Rank {rank} of {world_size} has no tokens to pack ({store.num_docs} documents in all).")
        self._epoch = self._cursor = 0
        self._perm = self._permutation(0)
        self._buffer: list[tuple[int, int, int, int]] = []  # (length, doc, start, end), sorted ascending
        self._stats = dict.fromkeys(_STAT_KEYS, 0)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self._docs)
        return np.random.default_rng((self.seed, epoch, self.rank)).permutation(n) if self.shuffle else np.arange(n)

    def _draw(self) -> None:
        """Top the buffer up with the current epoch's next documents; never crosses into the next epoch."""
        buffer, perm = self._buffer, self._perm
        while len(buffer) < self.buffer_size and self._cursor < len(perm):
            doc = self._docs[int(perm[self._cursor])]
            self._cursor += 1
            n = int(self._lengths[doc])
            if n:
                insort(buffer, (n, doc, 0, n))

    def _fill_row(self, row: np.ndarray) -> int:
        """Best-fit pieces into `row`; returns how many tokens were placed (< len(row) only at the end)."""
        buffer, store = self._buffer, self.store
        space, pos = row.size, 0
        while space:
            self._draw()
            if not buffer and self.loop:  # permutation exhausted and buffer empty: the epoch is used up
                self._epoch, self._cursor = self._epoch + 1, 0
                self._perm = self._permutation(self._epoch)
                self._draw()  # not empty: the constructor checked that this rank has tokens
            if not buffer:  # loop=False and the data is spent
                break
            i = bisect_right(buffer, (space, sys.maxsize)) - 1  # largest piece with length <= space
            if i >= 0:
                n, doc, start, end = buffer.pop(i)
            else:  # nothing fits: cut the largest piece and carry its remainder
                n, doc, start, end = buffer.pop()
                cut = start + space
                insort(buffer, (end - cut, doc, cut, end))
                self._stats["crops"] += 1
                n, end = space, cut
            if start:
                self._stats["carried_tokens"] += n  # tokens of a continuation, placed after their doc's cut
            row[pos : pos + n] = store.doc(doc)[start:end]
            pos += n
            space -= n
            if not buffer:
                self._draw()
                if not buffer:  # that was the epoch's last token: count it now, whether or not another follows
                    self._stats["epochs"] += 1
        return pos

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), int64 [B, seq_len]; raises `StopIteration` once a `loop=False` stream is spent."""
        width = self.seq_len + 1
        rows = np.full((self.batch_size, width), self.pad_id, dtype=np.int64)
        filled: list[int] = []
        for b in range(self.batch_size):
            n = self._fill_row(rows[b])
            if not n:  # the data ran out at a row boundary: no all-padding row
                break
            filled.append(n)
        if not filled:
            raise StopIteration
        rows = rows[: len(filled)]
        labels = rows[:, 1:].copy()
        for b, n in enumerate(filled):
            labels[b, n - 1 :] = IGNORE_INDEX  # targets at row positions >= n are padding
        placed = sum(filled)
        self._stats["rows"] += len(filled)
        self._stats["tokens"] += placed
        self._stats["padding_tokens"] += len(filled) * width - placed
        return torch.from_numpy(np.ascontiguousarray(rows[:, :-1])), torch.from_numpy(labels)

    __next__ = next_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def stats(self) -> dict[str, Any]:
        """Counts so far: rows, tokens (non-padding), padding_tokens, padding_fraction, crops, carried_tokens,
        epochs (passes over this rank's documents whose every token has been placed)."""
        out: dict[str, Any] = dict(self._stats)
        total = out["rows"] * (self.seq_len + 1)
        out["padding_fraction"] = out["padding_tokens"] / total if total else 0.0
        return out

    def _config(self) -> dict[str, Any]:
        return {"num_docs": self.store.num_docs, **{k: getattr(self, k) for k in _CONFIG_KEYS}}

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON resumption state: epoch, permutation position, buffered pieces, statistics."""
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "epoch": self._epoch,
            "cursor": self._cursor,
            "buffer": [[doc, start, end] for _, doc, start, end in self._buffer],
            "stats": dict(self._stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Packer state version {state.get('version')} is not {STATE_VERSION}.")
        saved, mine = state["config"], self._config()
        changed = [k for k in _STATE_KEYS if saved.get(k) != mine[k]]
        if changed:
            detail = ", ".join(f"{k} {saved.get(k)} → {mine[k]}" for k in changed)
            raise ValueError(f"Packer state was saved for a different stream ({detail}).")
        self._epoch = int(state["epoch"])
        self._perm = self._permutation(self._epoch)
        self._cursor = int(state["cursor"])
        if not 0 <= self._cursor <= len(self._perm):
            raise ValueError(f"Packer state cursor {self._cursor} is outside the permutation.")
        self._buffer = sorted((int(e) - int(s), int(d), int(s), int(e)) for d, s, e in state["buffer"])
        self._stats = {k: int(state["stats"][k]) for k in _STAT_KEYS}


def val_batches(
    store: TokenStore,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    pad_id: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation batches: store order, one pass, at most `max_batches` (None: all; none if empty)."""
    packer = BestFitPacker(
        store, seq_len, batch_size, rank=rank, world_size=world_size, shuffle=False, loop=False, pad_id=pad_id
    )
    yield from itertools.islice(packer, max_batches)
