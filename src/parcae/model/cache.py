"""Preallocated KV cache for a looped model, with per-iteration slots and sharing policies.

Storage. Two tensors, allocated once for `capacity` columns (prompt + new tokens):

* `outer` [n_prelude + n_coda, 2, B, H, capacity, D]: one slot per prelude and coda layer (they run once
  per token);
* `core` [n_slots, n_core, 2, B, H_core, capacity, D]: per core layer, `n_slots` *iteration slots*.

A forward over a chunk of n new tokens writes columns [length, length + n) of the slots it uses and
attends over columns [0, length + n) as a view: no per-token Python objects and no re-stacking (the
official cache keeps a dict of per-token tensors and re-stacks them on every update, O(T²) copies per
sequence; docs/official-format.md).

Policies (iteration i of the loop uses core slot `i mod n_slots`):

| policy     | n_slots     | iteration i of a new token attends to an earlier token's K/V from …                  |
|------------|-------------|--------------------------------------------------------------------------------------|
| `full`     | max_steps   | its iteration i (exactly what a full-sequence forward computes)                       |
| `budget:k` | min(k, max) | its latest iteration j ≡ i (mod k), j < max_steps (e.g. k = 2, T = 8: iteration 6 or 7) |
| `last`     | 1           | its final iteration (= `budget:1`)                                                     |

Tokens of the *same* chunk always attend to each other's current iteration (they are computed together),
so a policy only changes what tokens from earlier forwards contribute. KV memory per cached token and row:
2 · D · ((n_prelude + n_coda) · H + n_core · n_slots · H_core) elements.

Iterations a token skipped (adaptive exit, or a forward at a depth below the cache's `max_steps`): a token
that ran d iterations serves, for every iteration j ≥ d, the K/V of its last computed iteration d − 1, as if
its state had stopped moving. The slots are filled accordingly (`LayerKV.keep` during the loop, then
`KVCache.fill_skipped`), so with `full` a later token at iteration i sees iteration min(i, d − 1).
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import ParcaeConfig

POLICIES = ("full", "budget:K", "last")


@dataclass(frozen=True)
class KVPolicy:
    """How many iteration slots each core layer keeps: `full`, `budget:K` (K ≥ 1, cyclic) or `last`."""

    name: str
    budget: int | None = None

    @classmethod
    def parse(cls, spec: str | KVPolicy) -> KVPolicy:
        if isinstance(spec, KVPolicy):
            return spec
        text = str(spec).strip().lower()
        if text in ("full", "last"):
            return cls(text)
        kind, _, value = text.partition(":")
        if kind == "budget":
            try:
                budget = int(value)
            except ValueError:
                budget = None
            if budget is None or budget < 1:
                raise ValueError(f"KV policy {spec!r} needs a positive slot count, e.g. budget:2.")
            return cls("budget", budget)
        raise ValueError(f"unknown KV policy {spec!r}; choose one of {', '.join(POLICIES)}.")

    def num_slots(self, max_steps: int) -> int:
        if self.name == "full":
            return max_steps
        if self.name == "last":
            return 1
        return min(self.budget, max_steps)

    def __str__(self) -> str:
        return f"budget:{self.budget}" if self.name == "budget" else self.name


@dataclass
class Chunk:
    """Where the tokens of one cached forward go, and how they attend (built by `KVCache.begin`)."""

    start: int  # first cache column of the chunk
    end: int
    positions: Tensor | None  # [B, n] positions per row (left padding), or None: start … end − 1 for all rows
    attn_mask: Tensor | None  # [B or 1, 1, n, end] bool (True = attend), or None
    is_causal: bool  # SDPA's own causal mask (only for a first chunk without padding)
    real: Tensor | None  # [B, n] bool, False at padding; None without padding


class LayerKV:
    """One layer's cache slot for one forward: `Attention.forward` hands its new K/V to `update`.

    `keep` [B, n] (adaptive exit): tokens with False are frozen and re-serve `previous` (the slot of the
    iteration before) instead of their newly computed K/V.
    """

    __slots__ = ("attn_mask", "end", "is_causal", "keep", "keys", "previous", "start", "values")

    def __init__(
        self,
        keys: Tensor,
        values: Tensor,
        chunk: Chunk,
        keep: Tensor | None = None,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.keys, self.values = keys, values  # [B, H, capacity, D]
        self.start, self.end = chunk.start, chunk.end
        self.attn_mask, self.is_causal = chunk.attn_mask, chunk.is_causal
        self.keep, self.previous = keep, previous

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the chunk's k, v [B, H, n, D]; return all cached keys/values [B, H, end, D] (views)."""
        if self.keep is not None and self.previous is not None:
            keep = self.keep[:, None, :, None]
            k = torch.where(keep, k, self.previous[0][:, :, self.start : self.end])
            v = torch.where(keep, v, self.previous[1][:, :, self.start : self.end])
        self.keys[:, :, self.start : self.end] = k
        self.values[:, :, self.start : self.end] = v
        return self.keys[:, :, : self.end], self.values[:, :, : self.end]


class KVCache:
    """Keys and values of every layer (and core iteration slot) for a batch of `capacity` columns.

    Use: `model.new_cache(...)`, then `model.forward_cached(ids, cache)` for the prompt (one forward, with
    `attention_mask` for a left-padded batch) and for each new token. `length` counts filled columns.
    """

    def __init__(
        self,
        config: ParcaeConfig,
        batch_size: int,
        capacity: int,
        *,
        policy: str | KVPolicy = "full",
        max_steps: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.policy = KVPolicy.parse(policy)
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"a KV cache needs a positive batch size and capacity, got {batch_size}, {capacity}.")
        if capacity > config.max_seq_len:
            raise ValueError(
                f"{capacity} tokens exceed the model's context (max_seq_len {config.max_seq_len}): "
                "shorten the prompt or generate fewer tokens."
            )
        self.config = config
        self.batch_size, self.capacity = batch_size, capacity
        self.max_steps = (max_steps or config.mean_recurrence) if config.is_looped else 0
        if config.is_looped and self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}.")
        self.num_slots = self.policy.num_slots(self.max_steps) if config.is_looped else 0
        zeros = dict(device=device, dtype=dtype)
        self.outer = torch.zeros(
            config.n_prelude + config.n_coda, 2, batch_size, config.n_kv_heads, capacity, config.head_dim, **zeros
        )
        self.core = torch.zeros(
            self.num_slots, config.n_core, 2, batch_size, config.core_kv_heads, capacity, config.head_dim, **zeros
        )
        self._make_views()
        self.length = 0
        self.padding: Tensor | None = None  # [B] left-padding columns per row, set by the first chunk
        self._chunk: Chunk | None = None

    def _make_views(self) -> None:
        """Per-layer K/V views, made once per storage: a decode step asks for one per layer and iteration."""
        self._outer_views = [(layer[0], layer[1]) for layer in self.outer]
        self._core_views = [[(layer[0], layer[1]) for layer in slot] for slot in self.core]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (all preallocated)."""
        return sum(t.numel() * t.element_size() for t in (self.outer, self.core))

    def bytes_per_token(self) -> float:
        """KV bytes per cached column of one row (independent of capacity and batch)."""
        return self.nbytes() / (self.capacity * self.batch_size)

    # ------------------------------------------------------------------ one forward
    def begin(self, n: int, attention_mask: Tensor | None = None) -> Chunk:
        """Reserve columns for a chunk of n tokens; `attention_mask` [B, n] (1 = token, 0 = left padding)
        is accepted only for the first chunk."""
        start, end = self.length, self.length + n
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens; {self.length} are used, {n} more do not fit.")
        if attention_mask is not None:
            self._set_padding(attention_mask, n)
        device = self.outer.device
        positions = real = mask = None
        is_causal = start == 0 and n > 1
        if self.padding is not None:
            columns = torch.arange(start, end, device=device)
            positions = (columns[None, :] - self.padding[:, None]).clamp(min=0)
            real = columns[None, :] >= self.padding[:, None]
            keys = torch.arange(end, device=device)
            causal = keys[None, :] <= columns[:, None]  # [n, end]
            visible = keys[None, None, :] >= self.padding[:, None, None]  # [B, 1, end]
            # A padding query sees only itself: a fully masked row would give NaN in SDPA.
            mask = (causal & (visible | (keys[None, :] == columns[:, None]))).unsqueeze(1)
            is_causal = False
        elif start > 0 and n > 1:  # SDPA's is_causal aligns top-left, wrong with cached columns before the chunk
            keys = torch.arange(end, device=device)
            mask = (keys[None, :] <= torch.arange(start, end, device=device)[:, None])[None, None]
        self._chunk = Chunk(start, end, positions, mask, is_causal, real)
        return self._chunk

    def _set_padding(self, attention_mask: Tensor, n: int) -> None:
        if self.length:
            raise ValueError("attention_mask is only accepted with the first chunk (the prompt).")
        mask = torch.as_tensor(attention_mask, device=self.outer.device)
        if mask.shape != (self.batch_size, n):
            raise ValueError(f"attention_mask must have shape {(self.batch_size, n)}, got {tuple(mask.shape)}.")
        mask = mask.bool()
        counts = mask.sum(1)
        padding = n - counts
        expected = torch.arange(n, device=mask.device)[None, :] >= padding[:, None]
        if bool((counts == 0).any()) or not torch.equal(mask, expected):
            raise ValueError("attention_mask must describe left padding (0 … 0 1 … 1) with a token in every row.")
        self.padding = padding if bool((padding > 0).any()) else None

    def commit(self) -> None:
        """The chunk's columns are final: later forwards attend to them."""
        if self._chunk is not None:
            self.length = self._chunk.end
            self._chunk = None

    def select_rows(self, index: Tensor | list[int]) -> KVCache:
        """A new cache whose row i is a copy of row `index[i]` of this one (rows may repeat), with the same
        capacity, policy, filled columns and left padding.

        Prefix sharing: a prompt is cached once per distinct prompt (with room for what follows), then copied to
        one row per continuation, and each row goes on independently. One gather copies the whole capacity:
        cheaper than filling a fresh cache and copying the filled columns into it.
        """
        if self._chunk is not None:
            raise RuntimeError("commit the current chunk before copying cache rows.")
        index = torch.as_tensor(index, dtype=torch.long, device=self.outer.device)
        if index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"select_rows needs a non-empty 1-d list of row indices, got shape {tuple(index.shape)}.")
        if bool(((index < 0) | (index >= self.batch_size)).any()):
            raise ValueError(f"row indices must lie in [0, {self.batch_size}), got {index.tolist()}.")
        copy = _copy.copy(self)  # config, policy, slots, capacity and length carry over
        copy.batch_size = index.numel()
        copy.outer = self.outer.index_select(2, index)  # the batch dimension: 2 in `outer`, 3 in `core`
        copy.core = self.core.index_select(3, index)
        copy._make_views()
        padding = None if self.padding is None else self.padding[index]
        copy.padding = padding if padding is not None and bool(padding.any()) else None
        return copy

    # ------------------------------------------------------------------ slots
    def outer_layer(self, index: int) -> LayerKV:
        """Prelude layer i (index i) or coda layer j (index n_prelude + j)."""
        keys, values = self._outer_views[index]
        return LayerKV(keys, values, self._current())

    def core_layer(self, layer: int, iteration: int, keep: Tensor | None = None) -> LayerKV:
        keys, values = self._core_views[iteration % self.num_slots][layer]
        previous = self._core_views[(iteration - 1) % self.num_slots][layer] if keep is not None else None
        return LayerKV(keys, values, self._current(), keep, previous)

    def check_steps(self, steps: int) -> int:
        if steps > self.max_steps:
            raise ValueError(f"{steps} iterations exceed the cache's max_steps {self.max_steps}.")
        return steps

    def fill_skipped(self, done: int) -> None:
        """After a chunk ran `done` < max_steps iterations: iterations done … max_steps − 1 re-serve the K/V
        of iteration done − 1 (the module docstring's rule for skipped iterations)."""
        chunk = self._current()
        source = (done - 1) % self.num_slots
        targets = {j % self.num_slots for j in range(done, self.max_steps)} - {source}
        columns = slice(chunk.start, chunk.end)
        for target in sorted(targets):  # at most n_slots − 1 copies of the chunk's columns
            self.core[target, :, :, :, :, columns] = self.core[source, :, :, :, :, columns]

    def _current(self) -> Chunk:
        if self._chunk is None:
            raise RuntimeError("KVCache.begin must be called before the cache's slots are used.")
        return self._chunk


@dataclass
class CachedOutput:
    """One cached forward: `logits` [B, n, V]; `iterations` [B, n] core iterations each token ran (0 for
    padding and for a fixed-depth Transformer); `coda_passes` readout + coda + head runs over the chunk
    (1, or more with a probing exit criterion)."""

    logits: Tensor
    iterations: Tensor
    coda_passes: int
