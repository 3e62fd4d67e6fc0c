"""What a run records as it goes: RUN/metrics.jsonl, and the same entries to TensorBoard / W&B when asked."""

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from .checkpoint import write_atomic
from .config import TrainConfig
from .rundir import METRICS_FILE

LOOP_MEANS = ("state_norm", "recurrent_residual", "mean_depth")  # averaged over a step's micro-batches


class MetricsLog:
    """One JSON object per line (flushed, so a crash loses at most the line being written), then TensorBoard / W&B."""

    def __init__(self, run_dir: Path, config: TrainConfig) -> None:
        self.file = (run_dir / METRICS_FILE).open("a")
        self.tensorboard: Any = None  # a SummaryWriter when asked for
        self.wandb: Any = None  # a W&B run when asked for
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("tensorboard logging needs `pip install tensorboard`.") from None
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if config.wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError("W&B logging needs `pip install wandb`.") from None
            project = os.environ.get("WANDB_PROJECT", "parcae")
            self.wandb = wandb.init(project=project, dir=str(run_dir), config=config.to_dict())

    def write(self, entry: dict[str, Any]) -> None:
        entry = {key: _jsonable(value) for key, value in entry.items()}
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        flat, step = _flatten(entry), entry.get("step", 0)
        if self.tensorboard is not None:
            for key, value in flat.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        self.file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from (the resumed run logs them again), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("step", 0) <= step:
                kept.append(line)
    kept.append(json.dumps({"event": "resume", "step": step}))
    write_atomic(path, "\n".join(kept) + "\n")


def loop_metrics(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """A step's loop telemetry from its micro-batches' (`ParcaeOutput.metrics`)."""
    means = {key: sum(float(m[key]) for m in metrics) / len(metrics) for key in LOOP_MEANS}
    sampled = sum(m["sampled_core_passes"] for m in metrics)
    executed = sum(m["executed_core_passes"] for m in metrics)
    return {"rho_A": float(metrics[-1]["rho_A"]), **means, "executed_over_sampled": executed / max(sampled, 1e-9)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _flatten(entry: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in entry.items():
        flat.update(_flatten(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat
