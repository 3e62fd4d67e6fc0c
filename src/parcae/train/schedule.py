"""Learning-rate and Muon schedules, as functions of training progress in [0, 1].

Progress is step / total_steps for step and token budgets and elapsed / allowed time for a
`--minutes` budget, so one schedule serves every budget kind. A warm-up given in steps
(`warmup_steps`) does not depend on the budget, so it survives a resume with a new one.
"""

from __future__ import annotations

import math

SCHEDULES = ("trapezoid", "cosine", "constant")


def lr_multiplier(progress: float, kind: str, warmup: float, cooldown: float, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR.

    trapezoid: linear warm-up over the first `warmup` fraction, constant, then linear decay to
    `min_ratio` over the last `cooldown` fraction (the paper: 0 % warm-up, 50 % cooldown to 0).
    cosine: warm-up, then cosine decay to `min_ratio`. constant: warm-up, then 1.
    """
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    if kind == "constant":
        return 1.0
    if kind == "trapezoid":
        if cooldown <= 0 or progress < 1.0 - cooldown:
            return 1.0
        remaining = (1.0 - progress) / cooldown
        return min_ratio + (1.0 - min_ratio) * remaining
    if kind == "cosine":
        span = max(1.0 - warmup, 1e-12)
        phase = (progress - warmup) / span
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * phase))
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}.")


def scheduled_lr(
    step: int,
    fraction: float,
    total_steps: int | None,
    kind: str,
    *,
    warmup: float,
    warmup_steps: int | None,
    cooldown: float,
    min_ratio: float = 0.0,
) -> float:
    """The LR multiplier of optimizer step `step` (0-based), at `fraction` of a time budget when `total_steps`
    is None. `warmup_steps`, when given, replaces the `warmup` fraction.

    The schedule is read at the middle of the step, so neither the first warm-up step nor the last cooldown
    step gets a learning rate of exactly zero. With a known number of steps, `warmup_steps` is the equivalent
    fraction (the same shape, cosine included); under a time budget it is a linear ramp over those steps
    multiplying the rest of the schedule.
    """
    position = fraction if total_steps is None else (step + 0.5) / total_steps
    if warmup_steps is None:
        return lr_multiplier(position, kind, warmup, cooldown, min_ratio)
    if total_steps is not None:
        return lr_multiplier(position, kind, min(1.0, warmup_steps / total_steps), cooldown, min_ratio)
    ramp = min(1.0, (step + 0.5) / warmup_steps) if warmup_steps else 1.0
    return ramp * lr_multiplier(position, kind, 0.0, cooldown, min_ratio)


def muon_momentum(step: int, final: float = 0.95, start: float = 0.85, warmup_steps: int = 300) -> float:
    """Muon momentum warms linearly from 0.85 to 0.95 over the first 300 steps (the paper's recipe)."""
    if step >= warmup_steps:
        return final
    return start + (final - start) * step / warmup_steps


def muon_weight_decay(progress: float, initial: float) -> float:
    """Muon weight decay decays linearly to 0 over training."""
    return initial * (1.0 - min(max(progress, 0.0), 1.0))
