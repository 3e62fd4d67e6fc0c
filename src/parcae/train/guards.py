"""Guardrails: a run stops with a reason and a diagnosis rather than train on numbers that mean nothing
(repeated non-finite steps, divergence above `divergence_factor` × ln V, loss spikes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .config import TrainConfig


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, repeated non-finite steps); the message says why."""


class Guards:
    def __init__(self, config: TrainConfig, vocab_size: int, spectral_radius: Callable[[], float | None]) -> None:
        """`spectral_radius()`: ρ(Ā) or None (under FSDP a collective: guards fire on every rank alike)."""
        self.config, self.vocab_size, self.spectral_radius = config, vocab_size, spectral_radius
        self.skips = 0  # non-finite steps in a row
        self.diverged = 0  # finite steps in a row above the divergence bound
        self.loss_ema: float | None = None  # the running mean spikes are measured against

    def check_skips(self, record: dict[str, Any]) -> None:
        """Count non-finite steps in a row (after each step); too many stop the run."""
        self.skips = self.skips + 1 if record["skipped"] else 0
        if self.skips >= self.config.max_consecutive_skips:
            raise TrainingError(self._stop(record, f"{self.skips} consecutive steps had a non-finite loss or gradient"))

    def spike(self, record: dict[str, Any]) -> str | None:
        """The message when the step's loss is a spike (once the mean has settled: after step 20), else None."""
        loss, factor = record["loss"], self.config.spike_factor
        if factor > 0 and self.loss_ema is not None and record["step"] > 20 and loss > factor * self.loss_ema:
            return (
                f"step {record['step']}: loss spike {loss:.3f} > {factor} × running mean {self.loss_ema:.3f} "
                f"({self.diagnose(record)})"
            )
        return None

    def update_mean(self, loss: float) -> None:
        self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss

    def divergence(self, record: dict[str, Any]) -> str | None:
        """The error when this (finite) step makes the run one that diverged, else None."""
        factor = self.config.divergence_factor
        bound = factor * math.log(self.vocab_size)
        if factor <= 0 or not record["loss"] > bound:
            self.diverged = 0
            return None
        self.diverged += 1
        if self.diverged < self.config.max_consecutive_skips:
            return None
        what = (
            f"the training loss stayed above {factor:g} × ln {self.vocab_size} = {bound:.2f} "
            f"(worse than guessing uniformly) for {self.diverged} consecutive steps"
        )
        return f"{self._stop(record, what)} (--set divergence_factor=0 disables this)"

    def diagnose(self, record: dict[str, Any]) -> str:
        """What the loop's state says about a bad step."""
        rho = self.spectral_radius()
        parts = []
        if rho is not None:
            why = " ≥ 1: the linear part of the loop is not contractive" if rho >= 1 else ""
            parts.append(f"ρ(Ā) = {rho:.3f}{why}")
        if record.get("state_norm") is not None:
            parts.append(f"‖h_T‖ = {record['state_norm']:.3g}")
        return ", ".join(parts) or "the optimisation diverged"

    def _stop(self, record: dict[str, Any], what: str) -> str:
        return (
            f"{what}; stopping at step {record['step']}. Likely cause: {self.diagnose(record)}. "
            "Lower the learning rate or use injection=diagonal (ρ(Ā) < 1)."
        )
