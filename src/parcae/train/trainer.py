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
seeded from (seed, micro-step, rank), so a resumed run reproduces the uninterrupted one step for step,
also after a SIGKILL at any point (docs/reliability.md says what is guaranteed and how it is tested).
Under torchrun the same trainer runs on every rank; `DistributedContext` (train/distributed.py) holds
everything that differs between ranks, and with a single process all of it is the identity.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.packing import BestFitPacker, val_batches
from ..data.shards import INDEX_FILE, ShardStore, is_prepared, prepare, val_split_note
from ..data.tokenizer import TOKENIZER_FILE, Tokenizer, get_tokenizer, load_tokenizer
from ..eval.loss import DepthResult, loss_by_depth
from ..model.config import ParcaeConfig
from ..model.parcae import Parcae
from ..model.recurrence import DepthSampler
from .allocator import tune_cpu_allocator
from .budget import LoopTimes, StatusLines, time_allows_step
from .checkpoint import CheckpointError, CheckpointManager, CheckpointWriteError, write_atomic
from .config import RUN_CONFIG, TrainConfig, load_run_config, save_run_config
from .distributed import DistributedContext, restore_packer
from .schedule import muon_momentum, muon_weight_decay, scheduled_lr

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# What a run writes into its directory: a directory holding any of these (but no run) is not trained into.
RUN_FILES = (RUN_CONFIG, TOKENIZER_FILE, "data", METRICS_FILE, "checkpoints", SUMMARY_FILE, "tensorboard", "wandb")
# Periodic checkpoint writes that may fail in a row (disk full, …) before the run stops.
MAX_CHECKPOINT_FAILURES = 3


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, repeated non-finite steps); the message says why."""


@dataclass
class Progress:
    """Counters that a checkpoint restores."""

    step: int = 0  # optimiser steps taken (including skipped ones)
    micro_step: int = 0  # micro-batches consumed; seeds the depth sampler
    tokens: int = 0  # training tokens consumed (including padding positions)
    elapsed: float = 0.0  # seconds of the training loop: steps, validation and checkpoints (train/budget.py)
    skipped: int = 0
    rollbacks: int = 0


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
        parallel: str | None = None,
        overwrite: bool = False,
        status_every: float = 0.0,
    ) -> None:
        """`parallel` (ddp | fsdp) overrides the config's: how to distribute is a choice of each launch.
        `overwrite`: a new run in a directory that holds another run first renames that run to RUN.old-K
        (nothing is deleted). A new run that fails to start removes what it created (and puts a run it
        renamed back), so the same command can simply be given again. `status_every` > 0: without a progress
        bar, `echo` a one-line status after the first step and then every that many seconds."""
        self._started = time.perf_counter()  # for the summary's wall_seconds
        self.run_dir = Path(run_dir)
        self.on_backward = on_backward  # test hook: called after backward, before clipping
        saved_train = None
        if resume:  # every rank reads the saved config before the group forms, so before rank 0 rewrites it
            saved_model, saved_train = load_run_config(self.run_dir)
            model_config, config = saved_model, _with_budget(saved_train, config)
        elif model_config is None or config is None:
            raise ValueError("a new run needs a model config and a training config.")
        if parallel is not None:
            config = dataclasses.replace(config, parallel=parallel)
        self.dist = DistributedContext.from_environment(config.device, config.parallel)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.echo = echo if self.dist.is_main else _silent
        self.progress_bar = progress_bar and self.dist.is_main
        self.status = StatusLines(0.0 if progress_bar else status_every)
        self.model_config, self.config = model_config, config
        self.seq_len = config.seq_len or model_config.max_seq_len
        if self.seq_len > model_config.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}.")
        claim = None if resume else self.dist.on_main(lambda: _claim_run_dir(self.run_dir, overwrite, self.echo))
        try:
            self._set_up(resume, checkpoint, saved_train)
        except BaseException:
            if claim is not None and self.dist.is_main:
                claim.abandon()
            raise

    def _set_up(self, resume: bool, checkpoint: str | None, saved_train: TrainConfig | None) -> None:
        model_config, config = self.model_config, self.config
        if not resume:  # a resume records its (new) budget only once its checkpoint has loaded
            self.dist.on_main(lambda: save_run_config(self.run_dir, model_config, config))
        self.device = self.dist.device
        if self.device.type == "cpu" and config.tune_allocator:
            tune_cpu_allocator()
        torch.manual_seed(config.seed)

        data_dir = self.dist.on_main(self._prepare_data)  # rank 0 tokenizes (once per run); the others wait
        self.tokenizer = load_tokenizer(data_dir)
        self.train_store = ShardStore.open(data_dir, "train")
        self.packer = self.rank_packer(self.rank, self.world_size)
        self.validation_note: str | None = None  # why there is no validation, when there is none
        self.val_batches = self.dist.shard_batches(self._validation_batches(data_dir))

        self.model = Parcae(model_config).to(self.device)  # the same seed: the same weights on every rank
        self.model.depth_sampler = DepthSampler(
            model_config, seed=config.seed, rank=self.rank, lockstep=config.lockstep
        )
        if config.compile:
            self.model.compile_blocks()
        self.engine = self.dist.wrap(self.model)  # what the training forward calls (DDP wrapper / FSDP model)
        self.optimizer = self.dist.build_optimizer(self.model, config.optimizer_settings())
        self.checkpoints = CheckpointManager(self.run_dir, keep=config.keep_checkpoints)
        self.progress = Progress()
        self.loss_ema: float | None = None
        self.last_val: dict[int, float] = {}
        self._stop_requested = False
        self._consecutive_skips = 0
        self._consecutive_diverged = 0
        self._checkpoint_failures = 0
        self._checkpointed: tuple[int, Path] | None = None  # (step, path) of the checkpoint last written or read
        self.loop_times = LoopTimes()
        events = []
        if resume:
            events = self._resume(checkpoint)
            if saved_train is not None:
                events += self._budget_change(saved_train)
            self.dist.on_main(lambda: save_run_config(self.run_dir, self.model_config, self.config))
        if self.dist.is_main:
            self.metrics_file = (self.run_dir / METRICS_FILE).open("a")
            self.loggers = _optional_loggers(self.config, self.run_dir)
        for event in events:
            self._log(event)

    # ------------------------------------------------------------------ setup
    def _prepare_data(self) -> Path:
        """The tokenized data directory (tokenizing a raw spec into the run once); saves the tokenizer."""
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
        _check_tokens(data_dir, tokenizer)
        _save_tokenizer(tokenizer, self.run_dir)
        return data_dir

    def rank_packer(self, rank: int, world_size: int) -> BestFitPacker:
        """The training stream of rank `rank` in a `world_size`-rank run of this configuration."""
        return BestFitPacker(
            self.train_store, self.seq_len, self.config.batch_size, seed=self.config.seed, rank=rank,
            world_size=world_size, pad_id=self.tokenizer.pad_id,
        )  # fmt: skip

    def _validation_batches(self, data_dir: Path) -> list[tuple[Tensor, Tensor]]:
        """The validation batches (the same on every rank; `shard_batches` gives each rank its share)."""
        if self.config.eval_batches == 0:
            self.validation_note = "validation is off (eval_batches=0)."
            return []
        # No val split or an empty one: say why and what to do (a damaged split is an error: ShardStore.open).
        self.validation_note = val_split_note(data_dir)
        if self.validation_note is not None:
            self.echo(f"note: {self.validation_note}")
            return []
        store = ShardStore.open(data_dir, "val")
        return list(val_batches(store, self.seq_len, self.config.batch_size, self.config.eval_batches,
                                pad_id=self.tokenizer.pad_id))  # fmt: skip

    def _resume(self, checkpoint: str | None) -> list[dict[str, Any]]:
        """Restore everything from a checkpoint; returns events to log once the metrics file is open."""
        path = self.dist.on_main(lambda: self._checkpoint_to_resume(checkpoint))
        state = self.dist.load_checkpoint(self.checkpoints, path, self.model, self.optimizer)
        self.progress = Progress(**state["progress"])
        events = self._restore_data_position(state)
        self.loss_ema = state.get("loss_ema")
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["rng"]["torch"])), dtype=torch.uint8))
        self._checkpointed = (self.progress.step, path)
        if self.dist.is_main:
            _truncate_metrics(self.run_dir / METRICS_FILE, self.progress.step)
        self.echo(f"resumed from {path.name} (step {self.progress.step}, {self.progress.tokens:,} tokens)")
        return events

    def _checkpoint_to_resume(self, checkpoint: str | None) -> Path:
        if checkpoint is not None:
            path = self.checkpoints.root / checkpoint
            if not path.is_dir():
                raise CheckpointError(f"no checkpoint {checkpoint} in {self.checkpoints.root}")
            return path
        path = self.checkpoints.latest()
        if path is not None and path.is_dir():
            return path  # verified when it is read
        # No pointer: a crash between the first checkpoint's rename and the pointer's write (or a deletion).
        # A pointer naming nothing: damage. Either way, name the newest intact checkpoint rather than guess.
        newest = self.checkpoints.newest_valid()
        if newest is not None:
            problem = (
                "has no checkpoint pointer (checkpoints/latest is missing)" if path is None
                else f"has a checkpoint pointer naming {path.name!r}, which does not exist"
            )  # fmt: skip
            raise CheckpointError(
                f"{self.run_dir} {problem}; the newest intact checkpoint is {newest.name}: resume from it with "
                f"--checkpoint {newest.name}"
            )
        raise CheckpointError(
            f"{self.run_dir} has no checkpoint to resume from (it stopped before its first one); "
            "start it again with --overwrite"
        )

    def _restore_data_position(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """The packer where the run left off; at another world size also keep the global batch if possible."""
        saved = state["packers"] if "packers" in state else [state["packer"]]
        note = restore_packer(self.packer, saved)
        if note is None:
            return []
        before, cfg = len(saved), self.config
        rows = cfg.grad_accum * before
        if rows % self.world_size == 0:  # batch_size × grad_accum × world size stays what it was
            self.config = dataclasses.replace(cfg, grad_accum=rows // self.world_size)  # saved once resumed
            batch = f"grad_accum {cfg.grad_accum} → {self.config.grad_accum} keeps the global batch"
        else:
            batch = (
                f"the global batch changes from {cfg.batch_size * rows} to {self.tokens_per_step // self.seq_len} rows"
            )
        self.echo(f"world size {before} → {self.world_size}: {batch}; {note}")
        return [{"event": "world_size", "step": self.progress.step, "from": before, "to": self.world_size,
                 "grad_accum": self.config.grad_accum, "data": note}]  # fmt: skip

    def _budget_change(self, saved: TrainConfig) -> list[dict[str, Any]]:
        """A resume with a new budget: keep the warm-up the run started with (a fraction of another budget
        would move it, and a run past its warm-up could fall back into it), and say what else moves."""
        cfg = self.config
        old, new = _budget_of(saved), _budget_of(cfg)
        if old == new:
            return []
        parts = [f"budget {_budget_text(saved)} → {_budget_text(cfg)}"]
        old_steps = self._steps_in(saved)
        if cfg.warmup_steps is not None:
            parts.append(f"warm-up stays {cfg.warmup_steps:,} steps")
        elif cfg.warmup > 0 and old_steps is not None:
            kept = max(1, round(cfg.warmup * old_steps))
            self.config = dataclasses.replace(cfg, warmup_steps=kept)
            unit = "step" if kept == 1 else "steps"
            parts.append(f"warm-up kept at {kept:,} {unit} (warmup_steps={kept} in {RUN_CONFIG})")
        elif cfg.warmup > 0 and saved.minutes is not None and cfg.minutes is not None:
            fraction = cfg.warmup * saved.minutes / cfg.minutes  # the same seconds of the new budget
            if fraction + cfg.cooldown <= 1.0:
                self.config = dataclasses.replace(cfg, warmup=fraction)
                parts.append(f"warm-up kept at {60 * cfg.warmup * saved.minutes:,.0f} s (warmup={fraction:.4g})")
            else:
                parts.append(f"warm-up is now {cfg.warmup:.0%} of the new budget (its old length does not fit)")
        elif cfg.warmup > 0:
            parts.append(f"warm-up is now {cfg.warmup:.0%} of the new budget")
        if cfg.schedule == "trapezoid" and cfg.cooldown > 0:
            start = 1.0 - cfg.cooldown
            parts.append(f"the cooldown now starts at {self._budget_point(cfg, start)} "
                         f"(was {self._budget_point(saved, start)})")  # fmt: skip
        elif cfg.schedule == "cosine":
            parts.append("the cosine decay now spans the new budget")
        self.echo("resumed with a new budget: " + "; ".join(parts) + ".")
        return [{"event": "budget", "step": self.progress.step, "from": old, "to": new,
                 "warmup": self.config.warmup, "warmup_steps": self.config.warmup_steps}]  # fmt: skip

    def _steps_in(self, config: TrainConfig) -> int | None:
        """The optimizer steps `config`'s budget amounts to (None for a time budget)."""
        if config.steps is not None:
            return int(config.steps)
        if config.tokens is not None:
            return max(1, math.ceil(config.tokens / self.tokens_per_step))
        return None

    def _budget_point(self, config: TrainConfig, fraction: float) -> str:
        steps = self._steps_in(config)
        if steps is not None:
            return f"step {round(fraction * steps):,}"
        return f"{fraction * (config.minutes or 0.0):,.3g} min"

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

    def budget_allows_step(self) -> bool:
        """Whether to take another step: steps and tokens count exactly; a time budget stops before a step
        that, with the validation or checkpoint due after it, is expected to overrun it (train/budget.py).
        Every rank decides alike: the times are agreed."""
        if self.config.minutes is None:
            return self.fraction_done() < 1.0
        validates, checkpoints = self._due_after(self.progress.step + 1)
        estimate = self.loop_times.estimate(validates=validates, checkpoints=checkpoints)
        return time_allows_step(self.progress.elapsed, 60.0 * self.config.minutes, estimate)

    def _due_after(self, step: int) -> tuple[bool, bool]:
        """Whether a validation and a checkpoint follow step `step` (1-based)."""
        validates = bool(self.val_batches) and step % self.config.eval_every == 0
        return validates, step % self.config.checkpoint_every == 0

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.steps is None and cfg.tokens is None and cfg.minutes is None:
            raise ValueError("give a training budget: --steps, --tokens or --minutes.")
        start = {"event": "start", "step": self.progress.step, "params": self.model.num_parameters(),
                 "tokens_per_step": self.tokens_per_step, "device": str(self.device)}  # fmt: skip
        if self.dist.enabled:
            start.update(world_size=self.world_size, parallel=self.config.parallel)
        self._log(start)
        try:
            self._train_loop()
            if self._stop_requested:
                path = self._final_checkpoint()
                self.echo(f"stopped at step {self.progress.step}; checkpoint {path.name} saved. Resume with --resume.")
            else:
                if self.val_batches and self.progress.step % cfg.eval_every:
                    self._validate()
                self._final_checkpoint()
            return self._write_summary(interrupted=self._stop_requested)
        finally:
            # Drop the DDP wrapper before leaving the group: were its C++ reducer the group's last owner, freeing
            # it would tear the group down while holding the GIL and deadlock with gloo's worker threads.
            self.engine = self.model
            self.dist.close()

    def _train_loop(self) -> None:
        bar = self._progress_bar()
        # With several ranks Ctrl-C is a stop request too: a rank interrupted mid-collective could never checkpoint.
        previous = _install_stop_handlers(self, interrupt=self.dist.enabled)
        try:
            mark = time.perf_counter()
            while self.budget_allows_step() and not self._stop_requested:
                record = self._train_step()
                now = time.perf_counter()
                # Since the last mark: this step, and the logging after the previous one.
                seconds = self._agree_on_step_end(now - mark)
                self.progress.elapsed += seconds
                self.loop_times.add_step(seconds)
                mark = now
                ran = self._after_step(record)
                if ran:  # validated or checkpointed (every rank alike): that time counts too, agreed by all ranks
                    mark = time.perf_counter()
                    validation, checkpoint, spent = self.dist.all_reduce(
                        [ran.get("validation", 0.0), ran.get("checkpoint", 0.0), mark - now], op="max"
                    )
                    self.progress.elapsed += spent
                    if "validation" in ran:
                        self.loop_times.add_validation(validation)
                    if "checkpoint" in ran:
                        self.loop_times.add_checkpoint(checkpoint)
                self._report(record, bar)
        except KeyboardInterrupt:
            self._stop_requested = True
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if bar is not None:
                bar.close()

    def _agree_on_step_end(self, seconds: float) -> float:
        """Every rank takes the slowest rank's step time and stops if any rank was asked to: their budgets
        and stop decisions must agree, or one rank would wait forever in a collective the others never reach."""
        if not self.dist.enabled:
            return seconds
        seconds, stop = self.dist.all_reduce([seconds, float(self._stop_requested)], op="max")
        self._stop_requested = stop > 0
        return seconds

    def _train_step(self) -> dict[str, Any]:
        cfg, model, progress = self.config, self.model, self.progress
        fraction = self.fraction_done()
        multiplier = scheduled_lr(
            progress.step, fraction, self.total_steps, cfg.schedule, warmup=cfg.warmup,
            warmup_steps=cfg.warmup_steps, cooldown=cfg.cooldown, min_ratio=cfg.min_lr_ratio,
        )  # fmt: skip
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier
            if group["algorithm"] == "muon":
                group["momentum"] = muon_momentum(progress.step, final=cfg.muon_momentum)
                group["weight_decay"] = muon_weight_decay(fraction, cfg.muon_weight_decay)
        model.train()
        losses, metrics = [], []
        finite = True
        for micro in range(cfg.grad_accum):
            inputs, labels = (t.to(self.device, non_blocking=True) for t in self.packer.next_batch())
            with self.dist.gradient_sync(self.engine, enabled=micro == cfg.grad_accum - 1):
                with self._autocast():
                    out = self.engine(inputs, labels=labels, step=progress.micro_step, return_logits=False)
                progress.micro_step += 1
                progress.tokens += inputs.numel() * self.world_size
                loss = out.loss.float()
                metrics.append(out.metrics)  # also of a non-finite step: ‖h_T‖ is what diagnoses it
                if torch.isfinite(loss):
                    losses.append(loss.item())
                else:
                    finite = False
                # Backward even through a non-finite loss: the step is skipped anyway, and every rank must
                # take part in the same gradient reductions.
                (loss / cfg.grad_accum).backward()
        if self.on_backward is not None:
            self.on_backward(progress.step, model)
        grad_norm = self._clip_gradients()
        # One all-reduce: every rank logs the global mean loss and skips exactly when any rank saw a non-finite
        # loss or gradient (telemetry in `metrics` stays this rank's own).
        loss_sum, count, bad = self.dist.all_reduce(
            [sum(losses), len(losses), not finite or not math.isfinite(grad_norm)]
        )
        skipped = bad > 0
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
            "loss": loss_sum / count if count else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens": progress.tokens,
            "skipped": skipped,
        }
        if self.model_config.is_looped:  # a fixed-depth Transformer has no loop telemetry
            record.update(_loop_metrics(metrics))
        return record

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return float("nan")
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        return self.dist.clip_grad_norm(params, max_norm)

    def _after_step(self, record: dict[str, Any]) -> dict[str, float]:
        """Guardrails, logging, and the validation and checkpoint that are due: the seconds of those that ran."""
        cfg, progress = self.config, self.progress
        record["tok_per_s"] = progress.tokens / max(progress.elapsed, 1e-9)
        if record["skipped"]:
            self._log({**record, "event": "skip"})
            self.echo(f"step {progress.step}: non-finite loss or gradient, step skipped ({progress.skipped} so far)")
            if self._consecutive_skips >= cfg.max_consecutive_skips:
                raise TrainingError(
                    self._divergence_message(record, f"{self._consecutive_skips} consecutive steps had a non-finite "
                                                     "loss or gradient")
                )  # fmt: skip
        else:
            self._check_spike(record)
        logged = progress.step % cfg.log_every == 0 or progress.step == 1
        if logged:
            self._log(record)
        if not record["skipped"]:
            self._check_divergence(record, logged)
        validate, checkpoint = self._due_after(progress.step)
        ran: dict[str, float] = {}
        if validate:
            started = time.perf_counter()
            self._validate()
            ran["validation"] = time.perf_counter() - started
        if checkpoint:
            started = time.perf_counter()
            self._periodic_checkpoint()
            ran["checkpoint"] = time.perf_counter() - started
        return ran

    def _report(self, record: dict[str, Any], bar: Any) -> None:
        """The progress bar, or without one a status line now and then."""
        if bar is not None:
            self._update_bar(bar, record)
        elif self.status.due(time.perf_counter()):
            self.echo(self._status_line(record))

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
        path = self.dist.on_main(self.checkpoints.latest)
        if path is None:
            self.echo("no checkpoint to roll back to yet; continuing.")
            return
        state = self.dist.load_checkpoint(self.checkpoints, path, self.model, self.optimizer)
        progress.rollbacks += 1
        self.loss_ema = state.get("loss_ema")
        self._log({"event": "rollback", "step": progress.step, "to": path.name})
        self.echo(f"rolled back weights to {path.name}; the data stream continues from step {progress.step}.")

    def _check_divergence(self, record: dict[str, Any], logged: bool) -> None:
        """A finite divergence: the loss stays above `divergence_factor` × ln(V), worse than guessing uniformly
        (a fresh model starts near ln V). Such a run does not recover by itself, and without this guard it
        would train on to the end with finite, meaningless numbers."""
        factor = self.config.divergence_factor
        bound = factor * math.log(self.model_config.vocab_size)
        if factor <= 0 or not record["loss"] > bound:
            self._consecutive_diverged = 0
            return
        self._consecutive_diverged += 1
        if self._consecutive_diverged >= self.config.max_consecutive_skips:
            what = (
                f"the training loss stayed above {factor:g} × ln {self.model_config.vocab_size} = {bound:.2f} "
                f"(worse than guessing uniformly) for {self._consecutive_diverged} consecutive steps"
            )
            if not logged:  # metrics.jsonl shows the step that stopped the run
                self._log(record)
            raise TrainingError(f"{self._divergence_message(record, what)} (--set divergence_factor=0 disables this)")

    def _divergence_message(self, record: dict[str, Any], what: str) -> str:
        return (
            f"{what}; stopping at step {self.progress.step}. Likely cause: {self._state_diagnosis(record)}. "
            "Lower the learning rate or use injection=diagonal (ρ(Ā) < 1)."
        )

    def _state_diagnosis(self, record: dict[str, Any]) -> str:
        rho = self._spectral_radius() if self.model.config.is_looped else None
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
        with self._autocast():  # DDP: the plain module (no gradient sync); FSDP: the sharded one, on every rank
            results = loss_by_depth(self.model, self.val_batches, depths, state_seed=self.config.seed)
        results = self.dist.reduce_depth_results(results)
        self.last_val = {r.depth: r.loss for r in results}
        entry: dict[str, Any] = {"event": "val", "step": self.progress.step,
                                 "val_loss": {str(r.depth): r.loss for r in results}}  # fmt: skip
        if self.model_config.is_looped:
            entry["rho_A"] = self._spectral_radius()
            entry["state_norm"] = {str(r.depth): r.state_norm for r in results}
            entry["recurrent_residual"] = {str(r.depth): r.residual for r in results}
        self._log(entry)
        return results

    def _spectral_radius(self) -> float:
        """ρ(Ā) as a float (with FSDP the injection's shards are gathered for it: every rank must call this)."""
        with self.dist.full_parameters(self.model):
            return float(self.model.injection.spectral_radius())

    def _periodic_checkpoint(self) -> None:
        """A write that fails (disk full, …) leaves the earlier checkpoints intact (CheckpointManager.save);
        training goes on and the next interval tries again, since the cause may pass and stopping would lose
        the steps since the last checkpoint anyway. MAX_CHECKPOINT_FAILURES failures in a row stop the run:
        training on while nothing can be saved only grows what a crash would lose."""
        try:
            self._save_checkpoint()
        except CheckpointWriteError as err:
            self._checkpoint_failures += 1
            self._log({"event": "checkpoint_failed", "step": self.progress.step, "error": str(err)})
            if self._checkpoint_failures >= MAX_CHECKPOINT_FAILURES:
                failures = f"{self._checkpoint_failures} checkpoint writes failed in a row; stopping"
                raise CheckpointWriteError(f"{err} ({failures}){self._resume_hint()}") from None
            retry = self.progress.step + self.config.checkpoint_every
            self.echo(f"warning: {err}. Training continues; the next checkpoint is tried at step {retry}.")
        else:
            self._checkpoint_failures = 0

    def _final_checkpoint(self) -> Path:
        """The checkpoint of the step training ends at (not written again if the last interval saved it)."""
        if self._checkpointed is not None and self._checkpointed[0] == self.progress.step:
            return self._checkpointed[1]
        try:
            return self._save_checkpoint()
        except CheckpointWriteError as err:
            raise CheckpointWriteError(f"{err}{self._resume_hint()}") from None

    def _resume_hint(self) -> str:
        latest = self.checkpoints.latest()
        return f"; once the cause is fixed, --resume {self.run_dir} continues from {latest.name}" if latest else ""

    def _save_checkpoint(self) -> Path:
        packers = self.dist.all_gather_object(self.packer.state_dict())  # every rank's data position
        state = {
            "progress": vars(self.progress).copy(),
            **({"packers": packers} if self.dist.enabled else {"packer": packers[0]}),
            "loss_ema": self.loss_ema,
            "rng": {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()},
            "last_val": {str(k): v for k, v in self.last_val.items()},
        }
        path = self.dist.save_checkpoint(self.checkpoints, self.progress.step, self.model, self.optimizer, state)
        self._checkpointed = (self.progress.step, path)
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
            "train_seconds": round(self.progress.elapsed, 2),  # the time a --minutes budget counts
            "wall_seconds": round(time.perf_counter() - self._started, 2),  # this process, setup included
            "skipped_steps": self.progress.skipped,
            "final_val_loss": {str(k): v for k, v in self.last_val.items()} if self.last_val else None,
            **({"validation": self.validation_note} if self.validation_note else {}),
            "interrupted": interrupted,
            "latest_checkpoint": str(self.checkpoints.latest()),
        }
        if self.dist.is_main:
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            self.metrics_file.close()
        return summary

    def _progress_bar(self) -> Any:
        if not self.progress_bar:
            return None
        from tqdm.auto import tqdm

        if self.config.minutes is not None:  # a time budget: the bar counts the budget's seconds
            total = round(60 * self.config.minutes)
            bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} s [{remaining} left{postfix}]"
            return tqdm(total=total, initial=min(int(self.progress.elapsed), total), bar_format=bar_format,
                        dynamic_ncols=True, mininterval=1.0)  # fmt: skip
        steps, done = self.total_steps, self.progress.step
        return tqdm(total=steps, initial=done, unit="step", dynamic_ncols=True, mininterval=1.0)

    def _update_bar(self, bar: Any, record: dict[str, Any]) -> None:
        if self.config.minutes is not None:
            # Never past the total: tqdm shows a count beyond its total as "n/?" (validation may end past it).
            bar.update(min(int(self.progress.elapsed), bar.total) - bar.n)
        else:
            bar.update(1)
        bar.set_postfix(self._headline(record), refresh=False)

    def _headline(self, record: dict[str, Any]) -> dict[str, str]:
        """Loss, throughput and the latest validation loss (at μ_rec for a looped model)."""
        figures = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tok_per_s']:,.0f}"}
        if self.last_val:
            depth = self.model_config.mean_recurrence if self.model_config.is_looped else min(self.last_val)
            if depth in self.last_val:
                figures[f"val@{depth}" if self.model_config.is_looped else "val"] = f"{self.last_val[depth]:.3f}"
        return figures

    def _status_line(self, record: dict[str, Any]) -> str:
        """One line for a run without a progress bar: step, loss, throughput, and how far the budget is."""
        step = f"step {self.progress.step:,}" + (f"/{self.total_steps:,}" if self.total_steps else "")
        seconds = f"{self.progress.elapsed:,.0f}"
        if self.config.minutes is not None:
            seconds += f"/{60 * self.config.minutes:,.0f}"
        figures = " · ".join(f"{name} {value}" for name, value in self._headline(record).items())
        return f"{step} · {figures} · {seconds} s ({min(self.fraction_done(), 1.0):.0%})"

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def request_stop(self) -> None:
        self._stop_requested = True


# ---------------------------------------------------------------------- helpers
@dataclass
class _RunDirClaim:
    """What starting a new run did to its directory, so that a start that fails can undo it."""

    run_dir: Path
    existed: bool  # the directory was there before (possibly with unrelated files of the user's)
    before: frozenset[str]  # its entries then
    aside: Path | None  # where --overwrite renamed a previous run to

    def abandon(self) -> None:
        """Remove what the failed start created; put a run that --overwrite renamed back in place."""
        with contextlib.suppress(OSError):
            if not self.existed:
                shutil.rmtree(self.run_dir)
            else:  # only what is new: the user's own files stay
                for name in set(os.listdir(self.run_dir)) - self.before:
                    path = self.run_dir / name
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if self.aside is not None:
            with contextlib.suppress(OSError):  # if it cannot move back, it stays where the message said
                self.aside.rename(self.run_dir)


def _claim_run_dir(run_dir: Path, overwrite: bool, echo: Callable[[str], None]) -> _RunDirClaim:
    """Check that a new run may use `run_dir`, create it, and (with `overwrite`) move a previous run aside.

    Nothing a user wrote is ever overwritten: a directory that holds a run is refused unless `overwrite`
    (then renamed to RUN.old-K, never deleted); one that holds other files that a run would write
    (tokenizer.json, data/, …) is refused outright; unrelated files (notes, scripts) are left alone."""
    aside = None
    if (run_dir / RUN_CONFIG).exists():
        if not overwrite:
            raise ValueError(
                f"{run_dir} already holds a run; resume it with --resume {run_dir}, choose another --out, or "
                "pass --overwrite to move it aside."
            )
        k = 1
        while (aside := run_dir.with_name(f"{run_dir.name}.old-{k}")).exists():
            k += 1
        try:
            run_dir.rename(aside)
        except OSError as err:
            raise ValueError(f"cannot move the run in {run_dir} aside: {err.strerror or err}.") from None
        echo(f"--overwrite: moved the previous run in {run_dir} to {aside} (delete it when no longer needed)")
    elif run_dir.is_dir():
        taken = sorted(name for name in RUN_FILES if (run_dir / name).exists())
        if taken:
            raise ValueError(
                f"{run_dir} holds no run but has {', '.join(taken)}, which a run would overwrite; choose another --out."
            )
    existed = run_dir.is_dir()
    try:
        before = frozenset(os.listdir(run_dir)) if existed else frozenset()
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        claim = _RunDirClaim(run_dir, existed, before, aside)
        if aside is not None:
            claim.abandon()
        raise ValueError(f"cannot write to --out {run_dir}: {err.strerror or err}.") from None
    return _RunDirClaim(run_dir, existed, before, aside)


def _check_tokens(data_dir: Path, tokenizer: Tokenizer) -> None:
    """The shards must be intact (SHA-256, read once per start) and tokenized by this very tokenizer:
    anything else would train on silently wrong tokens."""
    for split in ("train", "val"):
        if split == "val" and not (data_dir / split / INDEX_FILE).is_file():
            continue
        store = ShardStore.open(data_dir, split)
        store.verify()
        index = store.index
        saved = (index.get("vocab_size"), index.get("bos_id"), index.get("pad_id"))
        if saved != (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.pad_id):
            raise ValueError(
                f"{data_dir / split} was tokenized with another tokenizer (vocab_size, bos, pad = {saved}) than "
                f"{data_dir / TOKENIZER_FILE} ({tokenizer.vocab_size}, {tokenizer.bos_id}, {tokenizer.pad_id}); "
                "prepare the data again."
            )


def _save_tokenizer(tokenizer: Tokenizer, run_dir: Path) -> None:
    """`RUN/tokenizer.json`, replaced atomically (it is rewritten on every start, resumes included)."""
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tokenizer-") as tmp:
        os.replace(tokenizer.save(tmp), run_dir / TOKENIZER_FILE)


def _with_budget(saved: TrainConfig, requested: TrainConfig | None) -> TrainConfig:
    """On resume, a newly given budget replaces the saved one; everything else stays as saved."""
    if requested is None or all(getattr(requested, b) is None for b in ("steps", "tokens", "minutes")):
        return saved
    return dataclasses.replace(saved, steps=requested.steps, tokens=requested.tokens, minutes=requested.minutes)


def _budget_of(config: TrainConfig) -> dict[str, float]:
    return {name: getattr(config, name) for name in ("steps", "tokens", "minutes") if getattr(config, name) is not None}


def _budget_text(config: TrainConfig) -> str:
    if config.steps is not None:
        return f"{config.steps:,} steps"
    if config.tokens is not None:
        return f"{config.tokens:,} tokens"
    return f"{config.minutes:g} min" if config.minutes is not None else "none"


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


def _install_stop_handlers(trainer: Trainer, interrupt: bool) -> dict[int, Any]:
    """SIGTERM (e.g. from a scheduler) — and SIGINT when `interrupt` — finishes the current step, checkpoints
    and exits cleanly. Returns the previous handlers."""
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT) if interrupt else (signal.SIGTERM,):
        with contextlib.suppress(ValueError):  # not in the main thread
            previous[signum] = signal.signal(signum, lambda *_: trainer.request_stop())
    return previous


def _silent(_: str) -> None:
    """`echo` on ranks other than 0."""


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
