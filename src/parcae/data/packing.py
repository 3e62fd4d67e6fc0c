"""BOS-aligned buffered best-fit packing of documents into rows of `seq_len + 1` tokens (batch: row[:-1], row[1:]).
Epoch `e` visits a rank's documents in `default_rng((seed, e, rank))`'s order and places each token exactly once;
a piece that fits nowhere is cut to fill the row (a "crop", its rest "carried"). Only `loop=False` ends in padding."""

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
_STATE_KEYS = ("num_docs", "seq_len", "seed", "rank", "world_size", "shuffle")  # must match to resume a state


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
        if min(seq_len, batch_size, buffer_size) < 1:
            raise ValueError(f"seq_len/batch_size/buffer_size must be positive: {seq_len}/{batch_size}/{buffer_size}.")
        self.store, self.seq_len, self.batch_size, self.buffer_size = store, seq_len, batch_size, buffer_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.loop, self.pad_id = shuffle, loop, pad_id
        self._docs = rank_documents(store.num_docs, rank, world_size)
        self._lengths = np.asarray(store.doc_lengths, dtype=np.int64)
        if loop and int(self._lengths[self._docs.start :: world_size].sum()) == 0:  # would never yield a row
            raise ValueError(f"Rank {rank} of {world_size} has no tokens to pack ({store.num_docs} documents in all).")
        self._start_epoch(0)
        self._buffer: list[tuple[int, int, int, int]] = []  # (length, doc, start, end), sorted ascending
        self._stats = dict.fromkeys(_STAT_KEYS, 0)

    def _start_epoch(self, epoch: int) -> None:
        n = len(self._docs)
        self._epoch, self._cursor = epoch, 0
        rng = np.random.default_rng((self.seed, epoch, self.rank))
        self._perm = rng.permutation(n) if self.shuffle else np.arange(n)

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
        buffer, space, pos = self._buffer, row.size, 0
        while space:
            self._draw()
            if not buffer and self.loop:  # permutation exhausted and buffer empty: the epoch is used up
                self._start_epoch(self._epoch + 1)
                self._draw()  # not empty: the constructor checked that this rank has tokens
            if not buffer:  # loop=False and the data is spent
                break
            i = bisect_right(buffer, (space, sys.maxsize)) - 1  # the largest piece that fits; -1 (the largest) if none
            n, doc, start, end = buffer.pop(i)
            if n > space:  # nothing fits: cut the largest piece and carry its remainder
                cut = start + space
                insort(buffer, (end - cut, doc, cut, end))
                self._stats["crops"] += 1
                n, end = space, cut
            if start:
                self._stats["carried_tokens"] += n  # tokens of a continuation, placed after their doc's cut
            row[pos : pos + n] = self.store.doc(doc)[start:end]
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
        """Counts so far: rows, tokens (non-padding), padding_*, crops, carried_tokens, epochs (passes fully placed)."""
        out: dict[str, Any] = dict(self._stats)
        total = out["rows"] * (self.seq_len + 1)
        out["padding_fraction"] = out["padding_tokens"] / total if total else 0.0
        return out

    def _config(self) -> dict[str, Any]:
        return {"num_docs": self.store.num_docs, **{k: getattr(self, k) for k in _CONFIG_KEYS}}

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON resumption state: epoch, permutation position, buffered pieces, statistics."""
        buffer = [[doc, start, end] for _, doc, start, end in self._buffer]
        progress = {"epoch": self._epoch, "cursor": self._cursor, "buffer": buffer, "stats": dict(self._stats)}
        return {"version": STATE_VERSION, "config": self._config(), **progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Packer state version {state.get('version')} is not {STATE_VERSION}.")
        saved, mine = state["config"], self._config()
        changed = [k for k in _STATE_KEYS if saved.get(k) != mine[k]]
        if changed:
            detail = ", ".join(f"{k} {saved.get(k)} → {mine[k]}" for k in changed)
            raise ValueError(f"Packer state was saved for a different stream ({detail}).")
        self._start_epoch(int(state["epoch"]))
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
