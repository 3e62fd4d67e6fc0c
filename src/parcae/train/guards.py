"""Guardrails, with a diagnosis: non-finite steps, divergence (loss above `divergence_factor` × ln V), loss spikes."""

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
        self.skips = self.skips + 1 if record["skipped"] else 0
        if self.skips >= self.config.max_consecutive_skips:
            raise TrainingError(self._stop(record, f"{self.skips} consecutive steps had a non-finite loss or gradient"))

    def check_spike(self, record: dict[str, Any]) -> str | None:
        """The spike message (after step 20: the mean has settled) or None; the mean takes all but rolled-back ones."""
        step, loss, factor, mean = record["step"], record["loss"], self.config.spike_factor, self.loss_ema
        spiked = factor > 0 and mean is not None and step > 20 and loss > factor * mean
        if not (spiked and self.config.rollback_on_spike):
            self.loss_ema = loss if mean is None else 0.95 * mean + 0.05 * loss
        if not spiked:
            return None
        return f"step {step}: loss spike {loss:.3f} > {factor} × running mean {mean:.3f} ({self.diagnose(record)})"

    def divergence(self, record: dict[str, Any]) -> str | None:
        """The error when this (finite) step makes the run one that diverged, else None."""
        factor = self.config.divergence_factor
        bound = factor * math.log(self.vocab_size)
        self.diverged = self.diverged + 1 if factor > 0 and record["loss"] > bound else 0
        if self.diverged < self.config.max_consecutive_skips:
            return None
        above = f"{factor:g} × ln {self.vocab_size} = {bound:.2f} (worse than guessing uniformly)"
        what = f"the training loss stayed above {above} for {self.diverged} consecutive steps"
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
        advice = "Lower the learning rate or use injection=diagonal (ρ(Ā) < 1)."
        return f"{what}; stopping at step {record['step']}. Likely cause: {self.diagnose(record)}. {advice}"
