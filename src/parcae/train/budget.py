"""What a `--minutes` budget covers, and when the trainer says how far it has got.

A time budget is the wall-clock time of the training loop: the optimizer steps and the validations and
checkpoints made along the way. Setup before the first step (tokenizing a raw corpus once per run, building
the model, loading a checkpoint) and the closing validation and checkpoint after the last step are not
counted: they do not grow with the budget, and counting the one-off tokenization would make the same
`--minutes` train less on a first start than on a resume. `summary.json` reports both `train_seconds`
(the budgeted time) and `wall_seconds` (since the trainer started: setup and closing work included).

The loop stops before a step that would not end within the budget, together with the validation or
checkpoint due after it: judged by the longest of the last few step times (depths are sampled, so step
times vary) plus the last validation's or checkpoint's time. The first step of a process is always taken
while time remains: nothing is known about its duration yet.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# Step times kept for the estimate: enough to see the spread of sampled depths, few enough to follow a change.
STEP_WINDOW = 8


class LoopTimes:
    """Recent durations (seconds, agreed between ranks) of the loop's parts, to estimate the next step's."""

    def __init__(self, window: int = STEP_WINDOW) -> None:
        self._steps: deque[float] = deque(maxlen=window)
        self._first_pending = True  # the process's first step carries one-off warm-up (kernels, allocator)
        self._validation = 0.0  # the last validation's seconds (0 until one has run)
        self._checkpoint = 0.0

    def add_step(self, seconds: float) -> None:
        if self._first_pending and self._steps:  # a representative step exists: forget the warm-up one
            self._steps.clear()
            self._first_pending = False
        self._steps.append(seconds)

    def add_validation(self, seconds: float) -> None:
        self._validation = seconds

    def add_checkpoint(self, seconds: float) -> None:
        self._checkpoint = seconds

    def estimate(self, *, validates: bool = False, checkpoints: bool = False) -> float | None:
        """The next step's seconds: the longest recent step, plus what is due after it; None before any step."""
        if not self._steps:
            return None
        return max(self._steps) + (self._validation if validates else 0.0) + (self._checkpoint if checkpoints else 0.0)


def time_allows_step(elapsed: float, budget_seconds: float, estimate: float | None) -> bool:
    """Whether a step started after `elapsed` seconds is expected to end within the budget."""
    if estimate is None:
        return elapsed < budget_seconds
    return elapsed + estimate <= budget_seconds


@dataclass
class StatusLines:
    """When to print a one-line status without a progress bar: after the first step, then every `every`
    seconds of wall-clock time (0: never)."""

    every: float
    _last: float | None = None

    def due(self, now: float) -> bool:
        if self.every <= 0:
            return False
        if self._last is None or now - self._last >= self.every:
            self._last = now
            return True
        return False
