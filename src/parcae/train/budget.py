"""What a budget counts and how far the run has got. `--minutes` counts the loop (steps, validations, checkpoints),
not setup or the closing checkpoint, so it trains alike on a first start and a resume; a first step is always taken."""

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from .config import TrainConfig

Echo = Callable[[str], None]

STEP_WINDOW = 8  # steps kept for the estimate: enough for the spread of sampled depths, few to follow a change


class LoopTimes:
    """Recent durations (seconds, agreed between ranks) of the loop's parts, to estimate the next step's."""

    def __init__(self, window: int = STEP_WINDOW) -> None:
        self._steps: deque[float] = deque(maxlen=window)
        self._first_pending = True  # the process's first step carries one-off warm-up (kernels, allocator)
        self._validation = self._checkpoint = 0.0  # the last validation's / checkpoint's seconds (0 until one ran)

    def add_step(self, seconds: float) -> None:
        if self._first_pending and self._steps:  # a representative step exists: forget the warm-up one
            self._steps.clear()
            self._first_pending = False
        self._steps.append(seconds)

    def add_validation(self, seconds: float) -> None:
        self._validation = seconds

    def add_checkpoint(self, seconds: float) -> None:
        self._checkpoint = seconds

    def estimate(self, validates: bool = False, checkpoints: bool = False) -> float | None:
        """The next step's seconds: the longest recent step, plus what is due after it; None before any step."""
        if not self._steps:
            return None
        return max(self._steps) + (self._validation if validates else 0.0) + (self._checkpoint if checkpoints else 0.0)


def budget_steps(config: TrainConfig, tokens_per_step: int) -> int | None:
    """The optimizer steps `config`'s budget amounts to (None for a time budget)."""
    if config.steps is not None:
        return int(config.steps)
    return None if config.tokens is None else max(1, math.ceil(config.tokens / tokens_per_step))


def time_allows_step(elapsed: float, budget_seconds: float, estimate: float | None) -> bool:
    return elapsed < budget_seconds if estimate is None else elapsed + estimate <= budget_seconds


class ProgressDisplay:
    """A tqdm bar (of seconds under a time budget, else of steps) or else a status line every `status_every` s."""

    def __init__(
        self, bar: bool, status_every: float, minutes: float | None, echo: Echo, val_depth: int | None
    ) -> None:
        """`val_depth`: the depth whose validation loss is shown (μ_rec of a looped model; None: the only one)."""
        self.wants_bar, self.status_every, self.minutes, self.echo = bar, status_every, minutes, echo
        self.val_depth, self._last_status = val_depth, -math.inf  # -inf: no status line yet
        self.bar: Any = None

    def open(self, total_steps: int | None, step: int, elapsed: float) -> None:
        self.total_steps = total_steps
        if not self.wants_bar:
            return
        from tqdm.auto import tqdm

        if self.minutes is not None:
            total = round(60 * self.minutes)
            bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} s [{remaining} left{postfix}]"
            initial = min(int(elapsed), total)
            self.bar = tqdm(total=total, initial=initial, bar_format=bar_format, dynamic_ncols=True, mininterval=1.0)
        else:
            self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0)

    def show(self, record: dict[str, Any], val: dict[int, float], elapsed: float, fraction: float, now: float) -> None:
        """After a step: its loss and throughput and the latest validation loss, on the bar or in a status line."""
        figures = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tok_per_s']:,.0f}"}
        depth = self.val_depth if self.val_depth is not None else min(val, default=None)
        if depth in val:
            figures[f"val@{depth}" if self.val_depth is not None else "val"] = f"{val[depth]:.3f}"
        if self.bar is not None:
            # Never past the total: tqdm shows a count beyond its total as "n/?" (validation may end past it).
            self.bar.update(min(int(elapsed), self.bar.total) - self.bar.n if self.minutes is not None else 1)
            self.bar.set_postfix(figures, refresh=False)
            return
        if self.status_every <= 0 or now - self._last_status < self.status_every:
            return
        self._last_status = now
        seconds = f"{elapsed:,.0f}" + (f"/{60 * self.minutes:,.0f}" if self.minutes is not None else "")
        text = " · ".join(f"{name} {value}" for name, value in figures.items())
        total = f"/{self.total_steps:,}" if self.total_steps else ""
        self.echo(f"step {record['step']:,}{total} · {text} · {seconds} s ({min(fraction, 1.0):.0%})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
