"""What a run records as it goes: RUN/metrics.jsonl, and the same entries to TensorBoard / W&B when asked."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from .checkpoint import write_atomic
from .config import TrainConfig
from .rundir import METRICS_FILE

Tracker = Callable[[dict[str, Any]], None]


class MetricsLog:
    """One JSON object per line (flushed, so a crash loses at most the line being written), then the trackers."""

    def __init__(self, run_dir: Path, config: TrainConfig) -> None:
        self.file = (run_dir / METRICS_FILE).open("a")
        self.trackers = _trackers(config, run_dir)

    def write(self, entry: dict[str, Any]) -> None:
        entry = {key: _jsonable(value) for key, value in entry.items()}
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        for tracker in self.trackers:
            tracker(entry)

    def close(self) -> None:
        self.file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from: the resumed run logs them again.
    A line cut short by a crash is dropped too; the file is replaced atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("step", 0) <= step:
            kept.append(line)
    kept.append(json.dumps({"event": "resume", "step": step}))
    write_atomic(path, "\n".join(kept) + "\n")


def loop_metrics(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """A step's loop telemetry from its micro-batches' (`ParcaeOutput.metrics`)."""
    sampled = sum(m["sampled_core_passes"] for m in metrics)
    executed = sum(m["executed_core_passes"] for m in metrics)
    return {
        "rho_A": float(metrics[-1]["rho_A"]),
        "state_norm": sum(float(m["state_norm"]) for m in metrics) / len(metrics),
        "recurrent_residual": sum(float(m["recurrent_residual"]) for m in metrics) / len(metrics),
        "mean_depth": sum(m["mean_depth"] for m in metrics) / len(metrics),
        "executed_over_sampled": executed / max(sampled, 1e-9),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _trackers(config: TrainConfig, run_dir: Path) -> list[Tracker]:
    trackers: list[Tracker] = []
    if config.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("tensorboard logging needs `pip install tensorboard`.") from None
        writer = SummaryWriter(str(run_dir / "tensorboard"))

        def to_tensorboard(entry: dict[str, Any]) -> None:
            for key, value in _flatten(entry).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, entry.get("step", 0))

        trackers.append(to_tensorboard)
    if config.wandb:
        try:
            import wandb
        except ImportError:
            raise ValueError("W&B logging needs `pip install wandb`.") from None
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "parcae"), dir=str(run_dir), config=config.to_dict())
        trackers.append(lambda entry: run.log(_flatten(entry), step=entry.get("step", 0)))
    return trackers


def _flatten(entry: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
