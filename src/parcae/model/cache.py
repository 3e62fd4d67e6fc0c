"""Preallocated KV cache for a looped model. Iteration i uses core slot `i mod n_slots`: a new token at iteration i sees
an earlier token's K/V of its iteration i (`full`: max_steps slots, exactly the full forward), of its latest iteration
j ≡ i (mod k) below max_steps (`budget:k`) or of its last (`last`); a chunk's tokens see each other's current iteration.
A token that ran d iterations (exit, or depth < max_steps) serves iteration d − 1 to all later ones, as if its state had
stopped (`full`: a later token at iteration i sees min(i, d − 1)). Measurements: docs/inference-efficiency.md."""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass

import torch
from torch import Tensor

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
        if kind != "budget":
            raise ValueError(f"unknown KV policy {spec!r}; choose one of {', '.join(POLICIES)}.")
        if not value.strip().isdecimal() or int(value) < 1:
            raise ValueError(f"KV policy {spec!r} needs a positive slot count, e.g. budget:2.")
        return cls("budget", int(value))

    def num_slots(self, max_steps: int) -> int:
        if self.name == "budget":
            return min(self.budget, max_steps)
        return max_steps if self.name == "full" else 1

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


@dataclass(slots=True)
class LayerKV:
    """A layer's slot in one forward (`Attention` calls `update`); tokens False in `keep` [B, n] re-serve `previous`."""

    keys: Tensor  # [B, H, capacity, D]
    values: Tensor
    chunk: Chunk
    keep: Tensor | None = None
    previous: tuple[Tensor, Tensor] | None = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the chunk's k, v [B, H, n, D]; return all cached keys/values [B, H, end, D] (views)."""
        start, end = self.chunk.start, self.chunk.end
        if self.keep is not None and self.previous is not None:
            keep = self.keep[:, None, :, None]
            k = torch.where(keep, k, self.previous[0][:, :, start:end])
            v = torch.where(keep, v, self.previous[1][:, :, start:end])
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """K/V of every layer and core slot for `capacity` columns, `length` filled (make one with `Parcae.new_cache`)."""

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
        cfg = self.config = config
        self.policy = KVPolicy.parse(policy)
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"a KV cache needs a positive batch size and capacity, got {batch_size}, {capacity}.")
        if capacity > cfg.max_seq_len:
            raise ValueError(f"{capacity} tokens exceed the model's context (max_seq_len {cfg.max_seq_len}).")
        self.batch_size, self.capacity = batch_size, capacity
        self.max_steps = (max_steps or cfg.mean_recurrence) if cfg.is_looped else 0
        if cfg.is_looped and self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}.")
        self.num_slots = self.policy.num_slots(self.max_steps) if cfg.is_looped else 0
        column = (capacity, cfg.head_dim)  # [capacity, D] per head
        kv = dict(device=device, dtype=dtype)  # outer: a slot per prelude and coda layer; core: n_slots per core layer
        self.outer = torch.zeros(cfg.n_prelude + cfg.n_coda, 2, batch_size, cfg.n_kv_heads, *column, **kv)
        self.core = torch.zeros(self.num_slots, cfg.n_core, 2, batch_size, cfg.core_kv_heads, *column, **kv)
        self._make_views()
        self.length = 0
        self.padding: Tensor | None = None  # [B] left-padding columns per row, set by the first chunk
        self._chunk: Chunk | None = None

    def _make_views(self) -> None:
        """Per-layer K/V views, made once per storage: a decode step asks for one per layer and iteration."""
        self._outer_views = [(layer[0], layer[1]) for layer in self.outer]
        self._core_views = [[(layer[0], layer[1]) for layer in slot] for slot in self.core]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.outer, self.core))

    def bytes_per_token(self) -> float:
        """KV bytes per cached column of one row (independent of capacity and batch)."""
        return self.nbytes() / (self.capacity * self.batch_size)

    def begin(self, n: int, attention_mask: Tensor | None = None) -> Chunk:
        """Reserve columns for n tokens; `attention_mask` [B, n] (1 = token, 0 = left padding): first chunk only."""
        start, end = self.length, self.length + n
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens; {self.length} are used, {n} more do not fit.")
        device = self.outer.device
        if attention_mask is not None:
            if self.length:
                raise ValueError("attention_mask is only accepted with the first chunk (the prompt).")
            given = torch.as_tensor(attention_mask, device=device).bool()
            if given.shape != (self.batch_size, n):
                raise ValueError(f"attention_mask must have shape {(self.batch_size, n)}, got {tuple(given.shape)}.")
            padding = n - given.sum(1)
            expected = torch.arange(n, device=device)[None, :] >= padding[:, None]
            if bool((padding == n).any()) or not torch.equal(given, expected):
                raise ValueError("attention_mask must describe left padding (0 … 0 1 … 1) with a token in every row.")
            self.padding = padding if bool((padding > 0).any()) else None
        positions = real = mask = None
        is_causal = start == 0 and n > 1 and self.padding is None  # SDPA's own mask aligns top-left: no cached columns
        if self.padding is not None or (start > 0 and n > 1):
            columns = torch.arange(start, end, device=device)
            keys = torch.arange(end, device=device)
            mask = (keys[None, :] <= columns[:, None])[None, None]  # [1, 1, n, end]
        if self.padding is not None:
            positions = (columns[None, :] - self.padding[:, None]).clamp(min=0)
            real = columns[None, :] >= self.padding[:, None]
            visible = keys >= self.padding[:, None, None, None]  # [B, 1, 1, end]
            # A padding query sees only itself: a fully masked row would give NaN in SDPA.
            mask = mask & (visible | (keys[None, :] == columns[:, None]))
        self._chunk = Chunk(start, end, positions, mask, is_causal, real)
        return self._chunk

    def commit(self) -> None:
        """The chunk's columns are final: later forwards attend to them."""
        if self._chunk is not None:
            self.length = self._chunk.end
            self._chunk = None

    def select_rows(self, index: Tensor | list[int]) -> KVCache:
        """A new cache whose row i copies row `index[i]` (rows may repeat): a cached prompt, a row per continuation."""
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
        """After a chunk ran `done` < max_steps iterations: iterations done … max_steps − 1 re-serve done − 1."""
        chunk = self._current()
        source = (done - 1) % self.num_slots
        targets = {j % self.num_slots for j in range(done, self.max_steps)} - {source}
        for target in sorted(targets):  # at most n_slots − 1 copies of the chunk's columns
            self.core[target, ..., chunk.start : chunk.end, :] = self.core[source, ..., chunk.start : chunk.end, :]

    def _current(self) -> Chunk:
        if self._chunk is None:
            raise RuntimeError("KVCache.begin must be called before the cache's slots are used.")
        return self._chunk


@dataclass
class CachedOutput:
    """One cached forward: `logits` [B, n, V]; `iterations` [B, n] core iterations per token (0 at padding and without
    a loop); `coda_passes` readout + coda + head runs over the chunk (more than 1 with a probing exit criterion)."""

    logits: Tensor
    iterations: Tensor
    coda_passes: int
