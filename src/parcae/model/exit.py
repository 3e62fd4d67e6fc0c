"""Adaptive per-token exit: a token stops after the first iteration count c ≥ m = `min_steps` at which its criterion
holds, at `max_steps` (default: the depth T) at the latest. Specs `KIND:VALUE[,min=N][,max=N]`, e.g. `argmax:3,max=16`:
* `kl:ε`: KL(p_c ‖ p_{c−1}) < ε nats (p: the next-token distribution); probes after each iteration c ≥ m − 1;
* `latent:ε`: ‖h_c − h_{c−1}‖₂ / ‖h_c‖₂ < ε; no probes (the coda runs once, at the end);
* `argmax:k`: argmax p was the same after the last k iterations; probes after each iteration c ≥ m − k + 1.
A probe (readout + coda + head, from iteration 1 on) is what `kl` and `argmax` cost; the last gives the output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EXIT_KINDS = ("kl", "latent", "argmax")


@dataclass(frozen=True)
class ExitCriterion:
    """`kind` ∈ {kl, latent, argmax}; `threshold` is ε (kl, latent) or k (argmax)."""

    kind: str
    threshold: float
    min_steps: int = 1
    max_steps: int | None = None  # None: the forward's depth

    def __post_init__(self) -> None:
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"unknown exit criterion {self.kind!r}; choose one of kl:EPS, latent:EPS, argmax:K.")
        if self.kind == "argmax" and (self.threshold != int(self.threshold) or self.threshold < 1):
            raise ValueError(f"argmax exit needs a positive integer count, got {self.threshold!r}.")
        if not self.threshold > 0:
            raise ValueError(f"{self.kind} exit needs a positive threshold, got {self.threshold!r}.")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 1:
            raise ValueError(f"min_steps must be a positive integer, got {self.min_steps!r}.")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < self.min_steps):
            raise ValueError(f"max_steps must be an integer ≥ min_steps ({self.min_steps}), got {self.max_steps!r}.")

    @classmethod
    def parse(cls, spec: str | ExitCriterion) -> ExitCriterion:
        if isinstance(spec, ExitCriterion):
            return spec
        head, *options = [part.strip() for part in str(spec).split(",")]
        kind, _, value = head.partition(":")
        kind = kind.strip().lower()
        if kind not in EXIT_KINDS or not value:
            raise ValueError(f"unknown exit spec {spec!r}; expected kl:EPS, latent:EPS or argmax:K (e.g. kl:5e-4).")
        try:
            threshold = float(value)
        except ValueError:
            raise ValueError(f"exit spec {spec!r}: {value!r} is not a number.") from None
        steps: dict[str, int] = {}
        for option in options:
            key, _, number = option.partition("=")
            if key.strip() not in ("min", "max") or not number.strip().isdigit():
                raise ValueError(f"exit spec {spec!r}: options are min=N and max=N, got {option!r}.")
            steps[f"{key.strip()}_steps"] = int(number)
        return cls(kind, threshold, **steps)

    def __str__(self) -> str:
        value = str(int(self.threshold)) if self.kind == "argmax" else f"{self.threshold:g}"
        options = "" if self.min_steps == 1 else f",min={self.min_steps}"
        options += "" if self.max_steps is None else f",max={self.max_steps}"
        return f"{self.kind}:{value}{options}"

    def tracker(self, shape: tuple[int, ...], device: torch.device) -> ExitTracker:
        return ExitTracker(self, shape, device)


class ExitTracker:
    """Per-token exit state for one forward over tokens of `shape` ([B, n])."""

    def __init__(self, criterion: ExitCriterion, shape: tuple[int, ...], device: torch.device) -> None:
        self.criterion = criterion
        self.done = torch.zeros(shape, dtype=torch.bool, device=device)
        self._previous: Tensor | None = None  # log-probs (kl) or argmax ids (argmax) after the last probe
        self._run = torch.zeros(shape, dtype=torch.long, device=device)

    def wants_logits(self, count: int) -> bool:
        """Whether iteration `count` needs the next-token logits (a probe); `latent` never does."""
        crit = self.criterion
        lookback = 2 if crit.kind == "kl" else int(crit.threshold)  # the probes one check compares
        return crit.kind != "latent" and count >= max(1, crit.min_steps - lookback + 1)

    def update(self, count: int, h_prev: Tensor, h: Tensor, logits: Tensor | None) -> Tensor:
        """Record iteration `count` (1-based); returns the sticky [B, n] mask of tokens that stopped."""
        crit = self.criterion
        met: Tensor | None = None
        if crit.kind == "latent":
            met = (h - h_prev).float().norm(dim=-1) < crit.threshold * h.float().norm(dim=-1)
        elif logits is not None:
            if crit.kind == "kl":
                logp = F.log_softmax(logits.float(), dim=-1)
                if self._previous is not None:
                    met = (logp.exp() * (logp - self._previous)).sum(-1) < crit.threshold
                self._previous = logp
            else:
                ids = logits.argmax(dim=-1)
                same = self._previous == ids if self._previous is not None else torch.zeros_like(self.done)
                self._run = torch.where(same, self._run + 1, torch.ones_like(self._run))
                self._previous = ids
                met = self._run >= int(crit.threshold)
        if met is not None and count >= crit.min_steps:
            self.done |= met
        return self.done
