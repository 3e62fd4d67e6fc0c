"""Depth plans and the loop: sampling T per sequence, truncated BPTT, compute ∝ sampled depth.

Training samples a depth T per sequence (or per batch / token), T = max(1, Poisson(μ_rec)); the last
k = min(T, μ_bwd) iterations run with gradients and the first n = T − k without (paper Alg. 4,
official `poisson-truncated-full`). A `DepthPlan` holds (n, k) for every row.

Execution. The update has no step-index input, so a row that needs fewer iterations can simply stop
early. Rows are sorted by their step count (descending) so that the rows still iterating at step i are
always a *prefix* of the batch: each iteration runs the core on `h[:m]` only (a view, no gather) and the
loop costs Σ_rows T_row row-passes — what was sampled — instead of the official B·max_row T
(every row runs to the batch's largest depth and is masked: ≈ 1.8× the sampled passes at μ 8 and 32 rows,
`benchmarks/core_passes.py`). During the gradient phase, rows that are done are split off and concatenated
back once at the end, so autograd never sees masked copies.

Per-token depths cannot be compacted that way (frozen tokens still serve K/V to active ones); rows are
still compacted by their largest token depth and tokens inside a row are frozen with `torch.where`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .config import ParcaeConfig

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 over the parts), e.g. (seed, step, rank)."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


@dataclass(frozen=True)
class DepthPlan:
    """Per-row (or per-token) iteration counts: n steps without gradient, then k steps with gradient.

    Both are int64 CPU tensors of shape [B] (per-sequence, per-batch, fixed) or [B, L] (per-token).
    """

    no_grad: Tensor
    grad: Tensor

    @property
    def total(self) -> Tensor:
        return self.no_grad + self.grad

    @property
    def per_token(self) -> bool:
        return self.no_grad.dim() == 2

    @classmethod
    def from_depths(cls, depths: Tensor, backprop_depth: int) -> DepthPlan:
        """The Parcae split of total depths T: k = min(T, μ_bwd) gradient steps at the end, n = T − k."""
        depths = torch.as_tensor(depths, dtype=torch.long).cpu()
        grad = depths.clamp(max=backprop_depth)
        return cls(no_grad=depths - grad, grad=grad)

    @classmethod
    def fixed(cls, batch_size: int, num_steps: int, grad_steps: int) -> DepthPlan:
        """Every row runs `num_steps`, the last `grad_steps` of them with gradient."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
        grad_steps = min(grad_steps, num_steps)
        no_grad = torch.full((batch_size,), num_steps - grad_steps, dtype=torch.long)
        return cls(no_grad=no_grad, grad=torch.full((batch_size,), grad_steps, dtype=torch.long))

    def check(self, batch_size: int, seq_len: int) -> None:
        shapes = {(batch_size,), (batch_size, seq_len)}
        if tuple(self.no_grad.shape) not in shapes or self.no_grad.shape != self.grad.shape:
            raise ValueError(
                f"depth plan shapes {tuple(self.no_grad.shape)} / {tuple(self.grad.shape)} do not fit a batch "
                f"of {batch_size} sequences of length {seq_len} (expected [B] or [B, L])."
            )
        if bool((self.no_grad < 0).any()) or bool((self.grad < 0).any()):
            raise ValueError("depth plan step counts must be non-negative.")
        if bool((self.total < 1).any()):
            raise ValueError("every row (or token) of a depth plan needs at least one iteration.")


class DepthSampler:
    """Samples training depth plans, reproducibly from (seed, step, rank).

    `lockstep=True` drops the rank from the seed so every rank draws the same depths. With
    `step=None` the global torch RNG is used instead (convenient in notebooks).
    """

    def __init__(self, cfg: ParcaeConfig, seed: int = 0, rank: int = 0, lockstep: bool = False) -> None:
        self.mode = cfg.depth_sampling
        self.mean = cfg.mean_recurrence
        self.backprop_depth = cfg.backprop_depth
        self.seed, self.rank, self.lockstep = seed, rank, lockstep

    def generator(self, step: int, salt: int = 0) -> torch.Generator:
        rank = 0 if self.lockstep else self.rank
        return torch.Generator().manual_seed(mix_seed(self.seed, step, rank, salt))

    def sample(self, batch_size: int, seq_len: int, step: int | None = None) -> DepthPlan:
        generator = None if step is None else self.generator(step)
        if self.mode == "fixed":
            return DepthPlan.fixed(batch_size, self.mean, self.backprop_depth)
        shape = {"per-sequence": (batch_size,), "per-batch": (1,), "per-token": (batch_size, seq_len)}[self.mode]
        rates = torch.full(shape, float(self.mean))
        depths = torch.poisson(rates, generator=generator).long().clamp(min=1)
        if self.mode == "per-batch":
            depths = depths.expand(batch_size).clone()
        return DepthPlan.from_depths(depths, self.backprop_depth)


@dataclass
class LoopInputs:
    """What the loop reads, computed once per forward by `Parcae.loop_inputs`: the prelude output `x`, the RoPE
    tables, the value-embedding lookups by layer, and for looped models e = RMSNorm(P(x)), the drive B̄·e
    [B, L, S], the injection's state operator `decay` (Ā's diagonal, W_h, or None for `add`) and the core
    blocks' value embeddings."""

    x: Tensor
    cos: Tensor
    sin: Tensor
    value_embeds: dict[int, Tensor]
    e: Tensor | None = None
    drive: Tensor | None = None
    decay: Tensor | None = None
    core_embeds: tuple[Tensor | None, ...] = ()

    def rows(self, index: slice | Tensor) -> LoopInputs:
        """The per-row invariants of the loop (drive, core value embeddings) for a prefix or a reordering of the
        rows: what the compacted loop hands `Parcae.step` with a subset of the states."""

        def pick(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t[index] if isinstance(index, slice) else t.index_select(0, index)

        return replace(self, drive=pick(self.drive), core_embeds=tuple(pick(t) for t in self.core_embeds))


@dataclass
class LoopResult:
    state: Tensor  # h_T, [B, L, S], in the original row order
    residual: Tensor  # mean over rows of the token-mean ‖h_T − h_{T−1}‖₂ (detached)
    executed_passes: int  # row-iterations actually computed
    sampled_passes: float  # Σ_rows T_row (per-token: Σ_rows mean_token T)


StepFn = Callable[[Tensor, LoopInputs], Tensor]  # step(h_rows, inputs_rows) -> new h_rows


def run_loop(step: StepFn, h: Tensor, plan: DepthPlan, inputs: LoopInputs) -> LoopResult:
    """Run the loop for every row as planned: n_row no-grad steps, then k_row steps with gradient.

    `step` is `Parcae.step`; `inputs` is sliced along with h (`LoopInputs.rows`).
    """
    batch = h.shape[0]
    if plan.per_token:
        row_no_grad, row_grad = plan.no_grad.amax(1), plan.grad.amax(1)
    else:
        row_no_grad, row_grad = plan.no_grad, plan.grad
    # One ordering that makes both phases' active rows a prefix whenever possible (always, for plans
    # from `DepthPlan.from_depths`): by no-grad count, then grad count, both descending.
    order = _descending_order(row_no_grad * (int(row_grad.max()) + 1) + row_grad)
    state = _Rows(h, inputs, plan if plan.per_token else None)
    state.permute(order)
    residual = torch.zeros(batch, dtype=torch.float32, device=h.device)
    executed = 0

    # Phase 1: no gradient, in place on the prefix.
    counts = row_no_grad[state.order].tolist()
    with torch.no_grad():
        state.h = state.h.clone() if state.h.requires_grad else state.h
        for i in range(counts[0] if counts else 0):
            active = _count_above(counts, i)
            new = state.advance(step, active, i, phase=0)
            finishing = _count_above(counts, i + 1)
            state.record_residual(residual, new, finishing, active)
            state.h[:active] = new
            executed += active

    # Phase 2: with gradient (if autograd is on). Reorder only if the grad counts are not already sorted.
    grad_counts = row_grad[state.order]
    if bool((grad_counts[1:] > grad_counts[:-1]).any()):
        state.permute(_descending_order(grad_counts))
        grad_counts = row_grad[state.order]
    counts = grad_counts.tolist()
    done: list[Tensor] = []
    live = state.h
    for j in range(counts[0] if counts else 0):
        active = _count_above(counts, j)
        if active < live.shape[0]:
            done.append(live[active:])
            live = live[:active]
        state.h = live
        new = state.advance(step, active, j, phase=1)
        with torch.no_grad():
            state.record_residual(residual, new, _count_above(counts, j + 1), active)
        live = new
        executed += active
    done.append(live)
    final = done[0] if len(done) == 1 else torch.cat(done[::-1], dim=0)

    sampled = float(plan.total.float().mean(1).sum()) if plan.per_token else float(plan.total.sum())
    return LoopResult(
        state=state.unpermute(final),
        residual=state.unpermute(residual).mean(),
        executed_passes=executed,
        sampled_passes=sampled,
    )


class _Rows:
    """The loop state and its invariants, kept in a row order where active rows form a prefix."""

    def __init__(self, h: Tensor, inputs: LoopInputs, token_plan: DepthPlan | None) -> None:
        self.h = h
        self.inputs = inputs
        self.order = torch.arange(h.shape[0])  # position → original row
        self.token_plan = token_plan
        self.token_counts: tuple[Tensor, Tensor] | None = None
        if token_plan is not None:
            self.token_counts = (token_plan.no_grad.to(h.device), token_plan.grad.to(h.device))

    def permute(self, order: Tensor) -> None:
        if bool((order == torch.arange(len(order))).all()):
            return
        index = order.to(self.h.device)
        self.h = self.h.index_select(0, index)
        self.inputs = self.inputs.rows(index)
        if self.token_counts is not None:
            self.token_counts = (self.token_counts[0][index], self.token_counts[1][index])
        self.order = self.order[order]

    def unpermute(self, x: Tensor) -> Tensor:
        if bool((self.order == torch.arange(len(self.order))).all()):
            return x
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(len(self.order))
        return x.index_select(0, inverse.to(x.device))

    def advance(self, step: StepFn, active: int, iteration: int, phase: int) -> Tensor:
        current = self.h[:active]
        new = step(current, self.inputs.rows(slice(0, active)))
        if self.token_counts is not None:
            still_iterating = (self.token_counts[phase][:active] > iteration).unsqueeze(-1)
            new = torch.where(still_iterating, new, current)
        return new

    def record_residual(self, residual: Tensor, new: Tensor, start: int, stop: int) -> None:
        """‖h_T − h_{T−1}‖ (token mean) for positions [start, stop), which take their last step of
        this phase now; stored under the rows' original indices."""
        if start < stop:
            delta = (new[start:stop].detach() - self.h[start:stop].detach()).float()
            rows = self.order[start:stop].to(residual.device)
            residual[rows] = delta.norm(dim=-1).mean(dim=-1)


def _descending_order(keys: Tensor) -> Tensor:
    return torch.argsort(keys, descending=True, stable=True)


def _count_above(sorted_desc: list[int], threshold: int) -> int:
    """How many entries of a descending list are > threshold (= the active prefix length)."""
    return bisect.bisect_left(sorted_desc, -threshold, key=lambda count: -count)
