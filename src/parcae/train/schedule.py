"""Learning-rate and Muon schedules, as functions of training progress in [0, 1] (step or time fraction)."""

from __future__ import annotations

import math

SCHEDULES = ("trapezoid", "cosine", "constant")


def lr_multiplier(progress: float, kind: str, warmup: float, cooldown: float, min_ratio: float = 0.0) -> float:
    """Base-LR multiplier: linear warm-up over the first `warmup` fraction; then constant, trapezoid (linear decay to
    `min_ratio` over the last `cooldown` fraction; the paper: 0 % warm-up, 50 % cooldown) or cosine to `min_ratio`."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    if kind == "constant" or (kind == "trapezoid" and (cooldown <= 0 or progress < 1.0 - cooldown)):
        return 1.0
    if kind == "trapezoid":
        return min_ratio + (1.0 - min_ratio) * ((1.0 - progress) / cooldown)
    if kind == "cosine":
        phase = (progress - warmup) / max(1.0 - warmup, 1e-12)
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
    """The LR multiplier of step `step` (0-based) read at its middle, so none is zero, or at `fraction` of a time budget
    (total_steps None). `warmup_steps` replaces `warmup`; under a time budget as a ramp (it survives a new budget)."""
    position = fraction if total_steps is None else (step + 0.5) / total_steps
    if warmup_steps is None:
        return lr_multiplier(position, kind, warmup, cooldown, min_ratio)
    if total_steps is not None:
        return lr_multiplier(position, kind, min(1.0, warmup_steps / total_steps), cooldown, min_ratio)
    ramp = min(1.0, (step + 0.5) / warmup_steps) if warmup_steps else 1.0
    return ramp * lr_multiplier(position, kind, 0.0, cooldown, min_ratio)


def muon_momentum(step: int, final: float = 0.95, start: float = 0.85, warmup_steps: int = 300) -> float:
    """Muon momentum warms linearly from 0.85 to 0.95 over the first 300 steps (the paper's recipe)."""
    return final if step >= warmup_steps else start + (final - start) * step / warmup_steps


def muon_weight_decay(progress: float, initial: float) -> float:
    """Muon weight decay decays linearly to 0 over training."""
    return initial * (1.0 - min(max(progress, 0.0), 1.0))
