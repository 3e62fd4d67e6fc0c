"""`generate` (also `Parcae.generate`): KV-cached sampling at any depth, left-padded batches, streaming, early exit."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .cache import CachedOutput, KVCache, KVPolicy
from .config import ParcaeConfig
from .exit import ExitCriterion


class CachedModel(Protocol):
    """What generation uses of `Parcae` (structural: the model module imports this one for `Parcae.generate`)."""

    config: ParcaeConfig

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
    def new_cache(self, batch: int, capacity: int, **kwargs: Any) -> KVCache: ...
    def forward_cached(self, input_ids: Tensor, cache: KVCache, **kwargs: Any) -> CachedOutput: ...
    def _check_inputs(self, input_ids: Tensor, labels: Tensor | None) -> tuple[int, int]: ...
    def _inference_depth(self, num_steps: int | None, exit: ExitCriterion | None) -> int: ...


@dataclass
class GenerationStep:
    """One decode step, per row [B]: the new token (`pad_id` after a stop), its core iterations, whether it stopped."""

    index: int
    tokens: Tensor
    iterations: Tensor
    finished: Tensor


@dataclass
class GenerationOutput:
    """Tokens and statistics of one `generate` call (times exclude whatever a stream's consumer does)."""

    tokens: Tensor  # [B, L + N]: the (left-padded) prompt, then the new tokens; `pad_id` after a row stopped
    new_tokens: list[list[int]]  # per row: the sampled ids, through the stop id when one was sampled
    iterations: list[list[int]]  # per row and new token: core iterations of the position that predicted it
    prompt_iterations: Tensor  # [B, L]: core iterations per prompt position (0 at padding)
    prompt_tokens: int  # real (non-padding) prompt tokens over all rows
    num_steps: int  # the depth T (the maximum, with an exit criterion); 0 for a fixed-depth Transformer
    kv_policy: str
    exit: str | None
    cache_bytes: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int  # cached forwards after the prompt (one token per row each)
    coda_passes: int  # readout + coda + head runs over all forwards (exit probes included)

    @property
    def mean_iterations(self) -> float:
        """Mean core iterations per generated token (num_steps without an exit criterion)."""
        counts = [c for row in self.iterations for c in row]
        return sum(counts) / len(counts) if counts else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.tokens.shape[0] * self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def decode_ms_per_step(self) -> float:
        """Latency of one decode step (one new token for every row)."""
        return 1000.0 * self.decode_seconds / self.decode_steps if self.decode_steps else 0.0

    def summary(self) -> str:
        depth = f"T={self.num_steps}" if self.num_steps else "fixed depth"  # 0: a Transformer has no loop
        if self.exit:
            depth = f"T≤{self.num_steps} ({self.exit}), mean {self.mean_iterations:.2f}"
        return (
            f"{sum(len(r) for r in self.new_tokens)} new tokens · {depth} · KV {self.kv_policy} "
            f"{self.cache_bytes / 2**20:.2f} MiB · prefill {self.prompt_tokens} tokens in "
            f"{self.prefill_seconds * 1000:.1f} ms · decode {self.decode_ms_per_step:.2f} ms/step "
            f"({self.decode_tokens_per_second:.0f} tokens/s)"
        )


class GenerationStream:
    """Iterator of `GenerationStep`s; `output` holds the `GenerationOutput` once the iterator is exhausted."""

    def __init__(self, steps: Iterator[GenerationStep]) -> None:
        self._steps = steps
        self.output: GenerationOutput | None = None  # set by the `steps` generator when it ends

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> GenerationStep:
        return next(self._steps)

    def finish(self) -> GenerationOutput:
        for _ in self:
            pass
        assert self.output is not None
        return self.output


def sample_next(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None, top_p: float | None = None
) -> Tensor:
    """Next ids [B] from logits [B, V]: argmax at temperature 0, else sampled after the top_k and nucleus top_p cuts."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop an id when the ids ranked above it already reach p (the most likely id always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def generate(
    model: CachedModel,
    input_ids: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    num_steps: int | None = None,
    kv_policy: str | KVPolicy = "full",
    exit: str | ExitCriterion | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: int | Sequence[int] | None = None,
    seed: int | None = None,
    stream: bool = False,
    attention_mask: Tensor | None = None,
    vocab_limit: int | None = None,
    pad_id: int = 0,
    state_seed: int = 0,
) -> GenerationOutput | GenerationStream:
    """Sample up to `max_new_tokens` per row after the prompt(s), [B, L] ids (left-padded: with `attention_mask`, 1 =
    token) or id lists (left-padded with `pad_id`). num_steps: depth T (default μ_rec; with `exit`, the most); stop:
    id(s) ending a row (kept); vocab_limit: ids ≥ it are never sampled; seed: sampling RNG (None: torch's global);
    state_seed: the h₀ seed. `stream=True` returns a `GenerationStream` of `GenerationStep`s instead."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer ≥ 0, got {max_new_tokens!r}.")
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0 (0 is greedy), got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}.")
    cfg = model.config
    policy = KVPolicy.parse(kv_policy)
    criterion = ExitCriterion.parse(exit) if exit is not None else None
    if criterion is not None and not cfg.is_looped:
        raise ValueError("adaptive exit needs a looped model (n_core > 0).")
    depth = model._inference_depth(num_steps, criterion) if cfg.is_looped else 0
    device = next(model.parameters()).device
    ids, mask = _prompt_batch(input_ids, attention_mask, pad_id, device)
    batch, prompt_len = ids.shape
    room = cfg.max_seq_len - prompt_len
    if room < 0:
        raise ValueError(f"the prompt ({prompt_len} tokens) is longer than the context ({cfg.max_seq_len} tokens).")
    if max_new_tokens > room:
        raise ValueError(f"{max_new_tokens} new tokens exceed the context: at most {room} tokens fit after the prompt.")
    model._check_inputs(ids, None)  # token ids in range: fail now, not at a stream's first step
    stops = torch.tensor([stop] if isinstance(stop, int) else list(stop or []), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def steps() -> Iterator[GenerationStep]:
        capacity = prompt_len + max(max_new_tokens - 1, 0)  # the last new token is sampled, never fed back
        cache = model.new_cache(batch, capacity, kv_policy=policy, max_steps=depth or None)
        forward = {"num_steps": depth or None, "exit": criterion, "state_seed": state_seed}
        tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
        iterations = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
        coda_passes, seconds = 0, []  # seconds per forward: the prefill, then each decode step
        prompt_iterations = torch.zeros(batch, prompt_len, dtype=torch.long, device=device)
        for index in range(max_new_tokens):
            started = time.perf_counter()
            if index == 0:
                out = model.forward_cached(ids, cache, attention_mask=mask, last_logits_only=True, **forward)
                prompt_iterations = out.iterations
            else:
                out = model.forward_cached(tokens[:, index - 1 : index], cache, **forward)
            with torch.inference_mode():  # sampling needs no autograd, as the cached forward
                logits = out.logits[:, -1]
                if vocab_limit is not None:
                    logits = logits.clone()
                    logits[:, vocab_limit:] = float("-inf")
                new = sample_next(logits, temperature, top_k, generator, top_p)
                new = torch.where(finished, torch.full_like(new, pad_id), new)  # stopped rows: pad_id, 0 iterations
                used = torch.where(finished, torch.zeros_like(new), out.iterations[:, -1])
            tokens[:, index], iterations[:, index] = new, used
            newly = ~finished & torch.isin(new, stops)
            lengths = torch.where(newly, index + 1, lengths)
            finished |= newly
            all_done = bool(finished.all())  # also synchronises the device before the clock is read
            seconds.append(time.perf_counter() - started)
            coda_passes += out.coda_passes
            yield GenerationStep(index, new, used, finished.clone())
            if all_done:
                break
        count = len(seconds)
        tokens, iterations = tokens[:, :count], iterations[:, :count]
        kept = lengths.clamp(max=count).tolist()
        generation.output = GenerationOutput(
            tokens=torch.cat([ids, tokens], dim=1),
            new_tokens=[row[:n] for row, n in zip(tokens.tolist(), kept, strict=True)],
            iterations=[row[:n] for row, n in zip(iterations.tolist(), kept, strict=True)],
            prompt_iterations=prompt_iterations,
            prompt_tokens=int(mask.sum()) if mask is not None else batch * prompt_len,
            num_steps=depth,
            kv_policy=str(policy),
            exit=str(criterion) if criterion is not None else None,
            cache_bytes=cache.nbytes(),
            prefill_seconds=seconds[0] if seconds else 0.0,
            decode_seconds=sum(seconds[1:], 0.0),
            decode_steps=len(seconds[1:]),
            coda_passes=coda_passes,
        )

    generation = GenerationStream(steps())
    return generation if stream else generation.finish()


def _prompt_batch(
    input_ids: Tensor | Sequence[Sequence[int]], attention_mask: Tensor | None, pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """[B, L] ids and mask (None without padding); token-id lists are left-padded with `pad_id`."""
    if isinstance(input_ids, Tensor):
        ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
        if ids.numel() == 0:
            raise ValueError("the prompt is empty: give at least one token (e.g. BOS) per row.")
        return ids.to(device), None if attention_mask is None else torch.as_tensor(attention_mask, device=device)
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a [B, L] tensor of ids, not with token-id lists.")
    rows = [list(map(int, row)) for row in input_ids]
    if not rows or any(not row for row in rows):
        raise ValueError("every prompt needs at least one token (e.g. BOS).")
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long, device=device)
    return ids, (mask if bool((mask == 0).any()) else None)
