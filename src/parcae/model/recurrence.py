"""Depth plans and the loop: T = max(1, Poisson(μ_rec)) per sequence, batch or token; the last k = min(T, μ_bwd) steps
with gradient (paper Alg. 4). Rows sorted by depth keep those still iterating a *prefix* `h[:m]`, so the loop costs the
sampled Σ_rows T_row passes, not the official B·max T (≈ 1.8× more at μ 8, 32 rows: `benchmarks/core_passes.py`).
Per-token depths run a row to its largest token depth, freezing finished tokens (`torch.where`) that still serve K/V."""

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
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


@dataclass(frozen=True)
class DepthPlan:
    """Iteration counts per row [B] or per token [B, L] (int64, CPU): n steps without gradient, then k with."""

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
        return cls.from_depths(torch.full((batch_size,), num_steps), grad_steps)

    def check(self, batch_size: int, seq_len: int) -> None:
        shapes = {(batch_size,), (batch_size, seq_len)}
        if tuple(self.no_grad.shape) not in shapes or self.no_grad.shape != self.grad.shape:
            got = f"{tuple(self.no_grad.shape)} / {tuple(self.grad.shape)}"
            raise ValueError(f"depth plan shapes {got} do not fit [B] or [B, L] (B = {batch_size}, L = {seq_len}).")
        if bool((self.no_grad < 0).any()) or bool((self.grad < 0).any()):
            raise ValueError("depth plan step counts must be non-negative.")
        if bool((self.total < 1).any()):
            raise ValueError("every row (or token) of a depth plan needs at least one iteration.")


class DepthSampler:
    """Training depth plans from (seed, step, rank) (`lockstep`: without rank), or the global RNG with `step=None`."""

    def __init__(self, cfg: ParcaeConfig, seed: int = 0, rank: int = 0, lockstep: bool = False) -> None:
        self.mode, self.mean, self.backprop_depth = cfg.depth_sampling, cfg.mean_recurrence, cfg.backprop_depth
        self.seed, self.rank, self.lockstep = seed, rank, lockstep

    def generator(self, step: int, salt: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
        rank = 0 if self.lockstep else self.rank
        return torch.Generator(device=device).manual_seed(mix_seed(self.seed, step, rank, salt))

    def sample(self, batch_size: int, seq_len: int, step: int | None = None) -> DepthPlan:
        generator = None if step is None else self.generator(step)
        if self.mode == "fixed":
            return DepthPlan.fixed(batch_size, self.mean, self.backprop_depth)
        shape = {"per-sequence": (batch_size,), "per-batch": (1,), "per-token": (batch_size, seq_len)}[self.mode]
        depths = torch.poisson(torch.full(shape, float(self.mean)), generator=generator).long().clamp(min=1)
        if self.mode == "per-batch":
            depths = depths.expand(batch_size).clone()
        return DepthPlan.from_depths(depths, self.backprop_depth)


@dataclass
class LoopInputs:
    """What the loop reads (`Parcae.loop_inputs`): prelude output, RoPE tables, value embeddings by layer and, when
    looped, e = RMSNorm(P(x)), the drive B̄·e [B, L, S], `decay` (Ā's diagonal, W_h, None for `add`), core embeddings."""

    x: Tensor
    cos: Tensor
    sin: Tensor
    value_embeds: dict[int, Tensor]
    e: Tensor | None = None
    drive: Tensor | None = None
    decay: Tensor | None = None
    core_embeds: tuple[Tensor | None, ...] = ()

    def rows(self, index: slice | Tensor) -> LoopInputs:
        """The per-row invariants (drive, core value embeddings) for a prefix or a reordering of the rows."""

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
    """Run the loop as planned: per row, n no-grad steps, then k with gradient (`step`: `Parcae.step`)."""
    row_no_grad, row_grad = (plan.no_grad.amax(1), plan.grad.amax(1)) if plan.per_token else (plan.no_grad, plan.grad)
    state = _Rows(h, inputs, (plan.no_grad.to(h.device), plan.grad.to(h.device)) if plan.per_token else None)
    # By no-grad, then grad count, descending: both phases' active rows a prefix (always, for `from_depths` plans).
    state.permute(torch.argsort(row_no_grad * (int(row_grad.max()) + 1) + row_grad, descending=True, stable=True))
    counts = row_no_grad[state.order].tolist()
    with torch.no_grad():  # phase 1: no gradient, in place on the prefix
        state.h = state.h.clone() if state.h.requires_grad else state.h
        for i in range(counts[0] if counts else 0):
            new = state.advance(step, counts, i, phase=0)
            state.h[: new.shape[0]] = new
    grad_counts = row_grad[state.order]  # phase 2: with gradient (if autograd is on), reordered only if unsorted
    if bool((grad_counts[1:] > grad_counts[:-1]).any()):
        state.permute(torch.argsort(grad_counts, descending=True, stable=True))
        grad_counts = row_grad[state.order]
    counts = grad_counts.tolist()
    done: list[Tensor] = []  # rows split off as they finish, so autograd never sees masked copies
    for j in range(counts[0] if counts else 0):
        new = state.advance(step, counts, j, phase=1)
        if new.shape[0] < state.h.shape[0]:
            done.append(state.h[new.shape[0] :])
        state.h = new
    done.append(state.h)
    final = done[0] if len(done) == 1 else torch.cat(done[::-1], dim=0)
    sampled = float(plan.total.float().mean(1).sum()) if plan.per_token else float(plan.total.sum())
    return LoopResult(state.unpermute(final), state.residual.mean(), state.executed, sampled)


class _Rows:
    """Loop state and invariants in a row order where active rows are a prefix, residuals, passes executed."""

    def __init__(self, h: Tensor, inputs: LoopInputs, token_counts: tuple[Tensor, Tensor] | None) -> None:
        self.h, self.inputs = h, inputs
        self.token_counts = token_counts  # per-token (no-grad, grad) steps, [B, L] on h's device; None: per row
        self.order = torch.arange(h.shape[0])  # position → original row
        self.residual = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        self.executed = 0

    def permute(self, order: Tensor) -> None:
        if _is_identity(order):
            return
        index = order.to(self.h.device)
        self.h = self.h.index_select(0, index)
        self.inputs = self.inputs.rows(index)
        if self.token_counts is not None:
            self.token_counts = (self.token_counts[0][index], self.token_counts[1][index])
        self.order = self.order[order]

    def unpermute(self, x: Tensor) -> Tensor:
        return x if _is_identity(self.order) else x.index_select(0, torch.argsort(self.order).to(x.device))

    def advance(self, step: StepFn, counts: list[int], iteration: int, phase: int) -> Tensor:
        """One iteration of a phase on the rows still iterating, the prefix where `counts` (descending) > iteration."""
        active = _count_above(counts, iteration)
        current = self.h[:active]
        new = step(current, self.inputs.rows(slice(0, active)))
        if self.token_counts is not None:
            new = torch.where((self.token_counts[phase][:active] > iteration).unsqueeze(-1), new, current)
        finishing = _count_above(counts, iteration + 1)
        if finishing < active:  # rows taking their last step of the phase: ‖h_T − h_{T−1}‖, token mean
            with torch.no_grad():
                delta = (new[finishing:active] - current[finishing:active]).float()
                self.residual[self.order[finishing:active].to(self.residual.device)] = delta.norm(dim=-1).mean(dim=-1)
        self.executed += active
        return new


def _is_identity(order: Tensor) -> bool:
    return bool((order == torch.arange(len(order))).all())


def _count_above(sorted_desc: list[int], threshold: int) -> int:
    """How many entries of a descending list are > threshold (= the active prefix length)."""
    return bisect.bisect_left(sorted_desc, -threshold, key=lambda count: -count)
