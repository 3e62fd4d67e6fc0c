"""The trainer: data → model → optimiser steps, with validation per depth, checkpoints and guardrails.

One `Trainer` runs one run directory:
```
RUN/run_config.json    model + training config (the effective one)
RUN/tokenizer.json     the tokenizer the run was trained with
RUN/data/              the tokenized corpus (unless --data named a prepared directory)
RUN/metrics.jsonl      one JSON object per logged step / validation / event
RUN/checkpoints/       step-XXXXXXXX/ (model, optimiser, trainer state) and the `latest` pointer
RUN/summary.json       written when training ends
```
Resuming restores model, optimiser, data position and step counters exactly; depths and h₀ are
seeded from (seed, micro-step, rank), so a resumed run reproduces the uninterrupted one step for step.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ParcaeConfig
from ..data.packing import BestFitPacker, val_batches
from ..data.shards import ShardStore, is_prepared, prepare
from ..data.tokenizer import Tokenizer, get_tokenizer, load_tokenizer
from ..eval.loss import DepthResult, loss_by_depth
from ..model.parcae import Parcae
from ..model.recurrence import DepthSampler
from .checkpoint import CheckpointError, CheckpointManager
from .config import TrainConfig, load_run_config, save_run_config
from .optim import build_optimizer
from .schedule import lr_multiplier, muon_momentum, muon_weight_decay

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, repeated non-finite steps); the message says why."""


@dataclass
class Progress:
    """Counters that a checkpoint restores."""

    step: int = 0  # optimiser steps taken (including skipped ones)
    micro_step: int = 0  # micro-batches consumed; seeds the depth sampler
    tokens: int = 0  # training tokens consumed (including padding positions)
    elapsed: float = 0.0  # training seconds, excluding validation and checkpointing
    skipped: int = 0
    rollbacks: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available.")
    return device


class Trainer:
    def __init__(
        self,
        model_config: ParcaeConfig | None,
        config: TrainConfig | None,
        run_dir: str | Path,
        *,
        resume: bool = False,
        checkpoint: str | None = None,
        progress_bar: bool = True,
        echo: Callable[[str], None] = print,
        on_backward: Callable[[int, Parcae], None] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.echo = echo
        self.progress_bar = progress_bar
        self.on_backward = on_backward  # test hook: called after backward, before clipping
        if resume:
            saved_model, saved_train = load_run_config(self.run_dir)
            model_config, config = saved_model, _with_budget(saved_train, config)
        else:
            if model_config is None or config is None:
                raise ValueError("a new run needs a model config and a training config.")
            _prepare_new_run_dir(self.run_dir)
        self.model_config, self.config = model_config, config
        save_run_config(self.run_dir, model_config, config)
        self.device = resolve_device(config.device)
        self.rank, self.world_size = 0, 1
        torch.manual_seed(config.seed)

        self.tokenizer, data_dir = self._prepare_data()
        self.seq_len = config.seq_len or model_config.max_seq_len
        if self.seq_len > model_config.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}.")
        self.train_store = ShardStore.open(data_dir, "train")
        self.packer = BestFitPacker(
            self.train_store, self.seq_len, config.batch_size, seed=config.seed, rank=self.rank,
            world_size=self.world_size, pad_id=self.tokenizer.pad_id,
        )  # fmt: skip
        self.val_batches = self._validation_batches(data_dir)

        self.model = Parcae(model_config).to(self.device)
        self.model.depth_sampler = DepthSampler(model_config, seed=config.seed, rank=self.rank)
        if config.compile:
            for block in self.model.blocks():
                block.compile(dynamic=True)
        self.optimizer = build_optimizer(self.model, config.optimizer_settings())
        self.checkpoints = CheckpointManager(self.run_dir, keep=config.keep_checkpoints)
        self.progress = Progress()
        self.loss_ema: float | None = None
        self.last_val: dict[int, float] = {}
        self._stop_requested = False
        self._consecutive_skips = 0
        if resume:
            self._resume(checkpoint)
        self.metrics_file = (self.run_dir / METRICS_FILE).open("a")
        self.loggers = _optional_loggers(config, self.run_dir)

    # ------------------------------------------------------------------ setup
    def _prepare_data(self) -> tuple[Tokenizer, Path]:
        cfg = self.config
        if is_prepared(cfg.data):
            data_dir = Path(cfg.data)
            tokenizer = load_tokenizer(data_dir)
            if cfg.tokenizer != "byte":
                requested = get_tokenizer(cfg.tokenizer)
                if requested.vocab_size != tokenizer.vocab_size or requested.kind != tokenizer.kind:
                    raise ValueError(f"--tokenizer {cfg.tokenizer} differs from the one {data_dir} was prepared with.")
        else:
            data_dir = self.run_dir / "data"
            if not is_prepared(data_dir):
                tokenizer = get_tokenizer(cfg.tokenizer)
                self.echo(f"tokenizing {cfg.data} into {data_dir} (once per run) …")
                prepare(
                    cfg.data, tokenizer, data_dir, text_field=cfg.text_field, val_fraction=cfg.val_fraction,
                    progress=self.progress_bar,
                )  # fmt: skip
            tokenizer = load_tokenizer(data_dir)
        if tokenizer.vocab_size > self.model_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.model_config.vocab_size}; use --set vocab_size={tokenizer.vocab_size} (or larger)."
            )
        tokenizer.save(self.run_dir)
        return tokenizer, data_dir

    def _validation_batches(self, data_dir: Path) -> list[tuple[Tensor, Tensor]]:
        if self.config.eval_batches == 0:
            return []
        try:
            store = ShardStore.open(data_dir, "val")
        except (ValueError, FileNotFoundError):
            self.echo("note: no validation split; validation is skipped.")
            return []
        batches = list(val_batches(store, self.seq_len, self.config.batch_size, self.config.eval_batches,
                                   pad_id=self.tokenizer.pad_id))  # fmt: skip
        if not batches:
            self.echo("note: the validation split is empty; validation is skipped.")
        return batches

    def _resume(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            path = self.checkpoints.root / checkpoint
            if not path.is_dir():
                raise CheckpointError(f"no checkpoint {checkpoint} in {self.checkpoints.root}")
        else:
            path = self.checkpoints.latest()
            if path is None:
                raise CheckpointError(f"{self.run_dir} has no checkpoint to resume from")
        state = self.checkpoints.load(path, self.model, self.optimizer)
        self.progress = Progress(**state["progress"])
        self.packer.load_state_dict(state["packer"])
        self.loss_ema = state.get("loss_ema")
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["rng"]["torch"])), dtype=torch.uint8))
        _truncate_metrics(self.run_dir / METRICS_FILE, self.progress.step)
        self.echo(f"resumed from {path.name} (step {self.progress.step}, {self.progress.tokens:,} tokens)")

    # ------------------------------------------------------------------ budget
    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.seq_len * self.config.grad_accum * self.world_size

    @property
    def total_steps(self) -> int | None:
        if self.config.steps is not None:
            return int(self.config.steps)
        if self.config.tokens is not None:
            return max(1, math.ceil(self.config.tokens / self.tokens_per_step))
        return None

    def fraction_done(self) -> float:
        if self.config.minutes is not None:
            return self.progress.elapsed / (60.0 * self.config.minutes)
        return self.progress.step / self.total_steps

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.steps is None and cfg.tokens is None and cfg.minutes is None:
            raise ValueError("give a training budget: --steps, --tokens or --minutes.")
        self._log({"event": "start", "step": self.progress.step, "params": self.model.num_parameters(),
                   "tokens_per_step": self.tokens_per_step, "device": str(self.device)})  # fmt: skip
        bar = self._progress_bar()
        previous = _install_stop_handler(self)
        try:
            while self.fraction_done() < 1.0 and not self._stop_requested:
                started = time.perf_counter()
                record = self._train_step()
                self.progress.elapsed += time.perf_counter() - started
                self._after_step(record, bar)
        except KeyboardInterrupt:
            self._stop_requested = True
        finally:
            signal.signal(signal.SIGTERM, previous)
            if bar is not None:
                bar.close()
        if self._stop_requested:
            path = self._save_checkpoint()
            self.echo(f"stopped at step {self.progress.step}; checkpoint {path.name} saved. Resume with --resume.")
        else:
            if self.val_batches and self.progress.step % cfg.eval_every:
                self._validate()
            self._save_checkpoint()
        return self._write_summary(interrupted=self._stop_requested)

    def _train_step(self) -> dict[str, Any]:
        cfg, model, progress = self.config, self.model, self.progress
        fraction = self.fraction_done()
        multiplier = lr_multiplier(fraction, cfg.schedule, cfg.warmup, cfg.cooldown, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier
            if group["algorithm"] == "muon":
                group["momentum"] = muon_momentum(progress.step, final=cfg.muon_momentum)
                group["weight_decay"] = muon_weight_decay(fraction, cfg.muon_weight_decay)
        model.train()
        losses, metrics = [], []
        finite = True
        for _ in range(cfg.grad_accum):
            inputs, labels = (t.to(self.device, non_blocking=True) for t in self.packer.next_batch())
            with self._autocast():
                out = model(inputs, labels=labels, step=progress.micro_step, return_logits=False)
            progress.micro_step += 1
            progress.tokens += inputs.numel() * self.world_size
            loss = out.loss.float()
            if not torch.isfinite(loss):
                finite = False
                continue
            (loss / cfg.grad_accum).backward()
            losses.append(loss.item())
            metrics.append(out.metrics)
        if self.on_backward is not None:
            self.on_backward(progress.step, model)
        grad_norm = self._clip_gradients()
        skipped = not finite or not math.isfinite(grad_norm)
        if skipped:
            progress.skipped += 1
            self._consecutive_skips += 1
        else:
            self.optimizer.step()
            self._consecutive_skips = 0
        self.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        record: dict[str, Any] = {
            "step": progress.step,
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens": progress.tokens,
            "skipped": skipped,
        }
        if metrics:
            record.update(_loop_metrics(metrics))
        return record

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return float("nan")
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _after_step(self, record: dict[str, Any], bar: Any) -> None:
        cfg, progress = self.config, self.progress
        record["tok_per_s"] = progress.tokens / max(progress.elapsed, 1e-9)
        if record["skipped"]:
            self._log({**record, "event": "skip"})
            self.echo(f"step {progress.step}: non-finite loss or gradient, step skipped ({progress.skipped} so far)")
            if self._consecutive_skips >= cfg.max_consecutive_skips:
                raise TrainingError(self._divergence_message(record))
        else:
            self._check_spike(record)
        if progress.step % cfg.log_every == 0 or progress.step == 1:
            self._log(record)
        if self.val_batches and progress.step % cfg.eval_every == 0:
            self._validate()
        if progress.step % cfg.checkpoint_every == 0:
            self._save_checkpoint()
        if bar is not None:
            self._update_bar(bar, record)

    def _check_spike(self, record: dict[str, Any]) -> None:
        loss = record["loss"]
        cfg = self.config
        armed = cfg.spike_factor > 0 and self.loss_ema is not None and self.progress.step > 20
        if armed and loss > cfg.spike_factor * self.loss_ema:
            message = (
                f"step {self.progress.step}: loss spike {loss:.3f} > {cfg.spike_factor} × running mean "
                f"{self.loss_ema:.3f} ({self._state_diagnosis(record)})"
            )
            self._log({"event": "spike", "step": self.progress.step, "loss": loss, "mean": self.loss_ema})
            self.echo(message)
            if cfg.rollback_on_spike:
                self._rollback()
                return
        self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss

    def _rollback(self) -> None:
        """Restore model and optimiser from the latest checkpoint; the data stream keeps moving forward."""
        progress = self.progress
        if progress.rollbacks >= self.config.max_rollbacks:
            raise TrainingError(f"loss spiked again after {progress.rollbacks} rollbacks; stopping.")
        path = self.checkpoints.latest()
        if path is None:
            self.echo("no checkpoint to roll back to yet; continuing.")
            return
        state = self.checkpoints.load(path, self.model, self.optimizer)
        progress.rollbacks += 1
        self.loss_ema = state.get("loss_ema")
        self._log({"event": "rollback", "step": progress.step, "to": path.name})
        self.echo(f"rolled back weights to {path.name}; the data stream continues from step {progress.step}.")

    def _divergence_message(self, record: dict[str, Any]) -> str:
        return (
            f"{self._consecutive_skips} consecutive steps had a non-finite loss or gradient; stopping at step "
            f"{self.progress.step}. Likely cause: {self._state_diagnosis(record)}. "
            "Lower the learning rate or use injection=diagonal (ρ(Ā) < 1)."
        )

    def _state_diagnosis(self, record: dict[str, Any]) -> str:
        rho = float(self.model.injection.spectral_radius()) if self.model.config.is_looped else None
        parts = []
        if rho is not None:
            parts.append(
                f"ρ(Ā) = {rho:.3f}" + (" ≥ 1: the linear part of the loop is not contractive" if rho >= 1 else "")
            )
        if record.get("state_norm") is not None:
            parts.append(f"‖h_T‖ = {record['state_norm']:.3g}")
        return ", ".join(parts) or "the optimisation diverged"

    # ------------------------------------------------------------------ validation, checkpoints, logging
    def _validate(self) -> list[DepthResult]:
        depths = self.config.depths_to_evaluate(self.model_config.mean_recurrence)
        if not self.model_config.is_looped:
            depths = depths[:1]
        with self._autocast():
            results = loss_by_depth(self.model, self.val_batches, depths, state_seed=self.config.seed)
        self.last_val = {r.depth: r.loss for r in results}
        entry: dict[str, Any] = {"event": "val", "step": self.progress.step,
                                 "val_loss": {str(r.depth): r.loss for r in results}}  # fmt: skip
        if self.model_config.is_looped:
            entry["rho_A"] = float(self.model.injection.spectral_radius())
            entry["state_norm"] = {str(r.depth): r.state_norm for r in results}
            entry["recurrent_residual"] = {str(r.depth): r.residual for r in results}
        self._log(entry)
        return results

    def _save_checkpoint(self) -> Path:
        state = {
            "progress": vars(self.progress).copy(),
            "packer": self.packer.state_dict(),
            "loss_ema": self.loss_ema,
            "rng": {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()},
            "last_val": {str(k): v for k, v in self.last_val.items()},
        }
        path = self.checkpoints.save(self.progress.step, self.model, self.optimizer, state)
        self._log({"event": "checkpoint", "step": self.progress.step, "path": path.name})
        return path

    def _log(self, entry: dict[str, Any]) -> None:
        entry = {key: _jsonable(value) for key, value in entry.items()}
        if hasattr(self, "metrics_file"):
            self.metrics_file.write(json.dumps(entry) + "\n")
            self.metrics_file.flush()
        for logger in getattr(self, "loggers", []):
            logger(entry)

    def _write_summary(self, interrupted: bool) -> dict[str, Any]:
        summary = {
            "run_dir": str(self.run_dir),
            "steps": self.progress.step,
            "tokens": self.progress.tokens,
            "train_seconds": round(self.progress.elapsed, 2),
            "skipped_steps": self.progress.skipped,
            "final_val_loss": {str(k): v for k, v in self.last_val.items()},
            "interrupted": interrupted,
            "latest_checkpoint": str(self.checkpoints.latest()),
        }
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        self.metrics_file.close()
        return summary

    def _progress_bar(self) -> Any:
        if not self.progress_bar:
            return None
        from tqdm.auto import tqdm

        if self.config.minutes is not None:  # a time budget: the bar counts training seconds
            total, initial = int(60 * self.config.minutes), int(self.progress.elapsed)
            bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]"
            return tqdm(total=total, initial=initial, bar_format=bar_format, dynamic_ncols=True, mininterval=1.0)
        steps, done = self.total_steps, self.progress.step
        return tqdm(total=steps, initial=done, unit="step", dynamic_ncols=True, mininterval=1.0)

    def _update_bar(self, bar: Any, record: dict[str, Any]) -> None:
        if self.config.minutes is not None:
            bar.update(int(self.progress.elapsed) - bar.n)
        else:
            bar.update(1)
        postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tok_per_s']:.0f}"}
        if self.last_val:
            depth = self.model_config.mean_recurrence if self.model_config.is_looped else min(self.last_val)
            if depth in self.last_val:
                postfix[f"val@{depth}" if self.model_config.is_looped else "val"] = f"{self.last_val[depth]:.3f}"
        bar.set_postfix(postfix, refresh=False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def request_stop(self) -> None:
        self._stop_requested = True


# ---------------------------------------------------------------------- helpers
def _prepare_new_run_dir(run_dir: Path) -> None:
    if (run_dir / "run_config.json").exists():
        raise ValueError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose another --out.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to --out {run_dir}: {err.strerror or err}.") from None


def _with_budget(saved: TrainConfig, requested: TrainConfig | None) -> TrainConfig:
    """On resume, a newly given budget replaces the saved one; everything else stays as saved."""
    if requested is None or all(getattr(requested, b) is None for b in ("steps", "tokens", "minutes")):
        return saved
    return dataclasses.replace(saved, steps=requested.steps, tokens=requested.tokens, minutes=requested.minutes)


def _loop_metrics(metrics: list[dict[str, Any]]) -> dict[str, Any]:
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from: the resumed run logs them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    kept.append(json.dumps({"event": "resume", "step": step}))
    path.write_text("\n".join(kept) + "\n")


def _install_stop_handler(trainer: Trainer) -> Any:
    """SIGTERM (e.g. from a scheduler) finishes the current step, checkpoints and exits cleanly."""
    try:
        return signal.signal(signal.SIGTERM, lambda *_: trainer.request_stop())
    except ValueError:  # not in the main thread
        return signal.getsignal(signal.SIGTERM)


def _optional_loggers(config: TrainConfig, run_dir: Path) -> list[Callable[[dict[str, Any]], None]]:
    loggers: list[Callable[[dict[str, Any]], None]] = []
    if config.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("tensorboard logging needs `pip install tensorboard`.") from None
        writer = SummaryWriter(str(run_dir / "tensorboard"))

        def to_tensorboard(entry: dict[str, Any]) -> None:
            step = entry.get("step", 0)
            for key, value in _flatten(entry).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, step)

        loggers.append(to_tensorboard)
    if config.wandb:
        try:
            import wandb
        except ImportError:
            raise ValueError("W&B logging needs `pip install wandb`.") from None
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "parcae"), dir=str(run_dir), config=config.to_dict())
        loggers.append(lambda entry: run.log(_flatten(entry), step=entry.get("step", 0)))
    return loggers


def _flatten(entry: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat
