"""The trainer: optimiser steps, validation per depth, checkpoints and guardrails; under torchrun every rank runs it."""

import base64
import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data.packing import BestFitPacker
from ..data.shards import ShardStore
from ..data.tokenizer import load_tokenizer
from ..eval.loss import DepthResult, loss_by_depth
from ..model.config import ParcaeConfig
from ..model.parcae import Parcae
from ..model.recurrence import DepthSampler
from .allocator import tune_cpu_allocator
from .budget import LoopTimes, ProgressDisplay, budget_steps, time_allows_step
from .checkpoint import CheckpointManager, CheckpointWriteError
from .config import TrainConfig, load_run_config, save_run_config
from .distributed import DistributedContext
from .guards import Guards, TrainingError
from .metrics import MetricsLog, loop_metrics, truncate_metrics
from .optim import build_optimizer
from .resume import budget_change, checkpoint_to_resume, restore_data_position, with_budget
from .rundir import METRICS_FILE, SUMMARY_FILE, claim_run_dir, prepare_data, validation_batches
from .schedule import muon_momentum, muon_weight_decay, scheduled_lr

MAX_CHECKPOINT_FAILURES = 3  # periodic checkpoint writes that may fail in a row (disk full, …) before the run stops


@dataclasses.dataclass
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
        """`parallel` overrides the config's; `overwrite` moves a run in `run_dir` aside; a failed start is undone."""
        self._started = time.perf_counter()  # for the summary's wall_seconds
        self.run_dir = Path(run_dir)
        self.on_backward = on_backward  # test hook: called after backward, before clipping
        saved_train = None
        if resume:  # every rank reads the saved config before the group forms, so before rank 0 rewrites it
            model_config, saved_train = load_run_config(self.run_dir)
            config = with_budget(saved_train, config)
        elif model_config is None or config is None:
            raise ValueError("a new run needs a model config and a training config.")
        if parallel is not None:
            config = dataclasses.replace(config, parallel=parallel)
        self.dist = DistributedContext.from_environment(config.device, config.parallel)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.echo = echo if self.dist.is_main else lambda _: None
        self.progress_bar = progress_bar and self.dist.is_main
        val_depth = model_config.mean_recurrence if model_config.is_looped else None
        self.display = ProgressDisplay(self.progress_bar, status_every, config.minutes, self.echo, val_depth)
        self.model_config, self.config = model_config, config
        self.seq_len = config.seq_len or model_config.max_seq_len
        if self.seq_len > model_config.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}.")
        claim = None if resume else self.dist.on_main(lambda: claim_run_dir(self.run_dir, overwrite, self.echo))
        try:
            self._set_up(checkpoint, saved_train)
        except BaseException:
            if claim is not None and self.dist.is_main:
                claim.abandon()
            raise

    def _set_up(self, checkpoint: str | None, saved_train: TrainConfig | None) -> None:
        """Everything a run needs before its first step; `saved_train`: the saved config of a run to resume."""
        model_config, config, run_dir = self.model_config, self.config, self.run_dir
        if saved_train is None:  # a resume records its (new) budget only once its checkpoint has loaded
            self.dist.on_main(lambda: save_run_config(run_dir, model_config, config))
        self.device = self.dist.device
        if self.device.type == "cpu" and config.tune_allocator:
            tune_cpu_allocator()
        torch.manual_seed(config.seed)
        # Rank 0 tokenizes (once per run) and saves the tokenizer; the others wait.
        data_dir = self.dist.on_main(lambda: prepare_data(config, model_config, run_dir, self.echo, self.progress_bar))
        self.tokenizer = load_tokenizer(data_dir)
        self.train_store = ShardStore.open(data_dir, "train")
        self.packer = self.rank_packer(self.rank, self.world_size)
        batches, self.validation_note = validation_batches(config, data_dir, self.seq_len, self.tokenizer, self.echo)
        self.val_batches = self.dist.shard_batches(batches)  # this rank's share
        self.model = model = Parcae(model_config).to(self.device)  # the same seed: the same weights on every rank
        model.depth_sampler = DepthSampler(model_config, seed=config.seed, rank=self.rank, lockstep=config.lockstep)
        if config.compile:
            model.compile_loop()
        self.engine = self.dist.wrap(model)  # what the training forward calls (DDP wrapper / FSDP model)
        self.optimizer = build_optimizer(model, config, sharded=self.dist.sharded)
        self.checkpoints = CheckpointManager(run_dir, keep=config.keep_checkpoints)
        self.progress = Progress()
        self.guards = Guards(config, model_config.vocab_size, self._spectral_radius)
        self.last_val: dict[int, float] = {}
        self.loop_times = LoopTimes()
        self._stop_requested = False
        self._checkpoint_failures = 0
        self._checkpointed: tuple[int, Path] | None = None  # (step, path) of the checkpoint last written or read
        events = [] if saved_train is None else self._resume(checkpoint, saved_train)
        self.metrics_file = MetricsLog(run_dir, self.config) if self.dist.is_main else None
        self._log = self.metrics_file.write if self.metrics_file is not None else lambda _: None  # rank 0 logs
        for event in events:
            self._log(event)

    def rank_packer(self, rank: int, world_size: int) -> BestFitPacker:
        """The training stream of rank `rank` in a `world_size`-rank run of this configuration."""
        stream = dict(seed=self.config.seed, rank=rank, world_size=world_size, pad_id=self.tokenizer.pad_id)
        return BestFitPacker(self.train_store, self.seq_len, self.config.batch_size, **stream)

    def _resume(self, checkpoint: str | None, saved: TrainConfig) -> list[dict[str, Any]]:
        """Restore everything from a checkpoint; returns events to log once the metrics file is open."""
        path = self.dist.on_main(lambda: checkpoint_to_resume(self.checkpoints, self.run_dir, checkpoint))
        state = self.dist.load_checkpoint(self.checkpoints, path, self.model, self.optimizer)
        self.progress = progress = Progress(**state["progress"])
        self.config, events = restore_data_position(self.packer, state, self.config, self.echo)
        self.guards.loss_ema = state.get("loss_ema")
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["rng"]["torch"])), dtype=torch.uint8))
        self._checkpointed = (progress.step, path)
        if self.dist.is_main:
            truncate_metrics(self.run_dir / METRICS_FILE, progress.step)
        self.echo(f"resumed from {path.name} (step {progress.step}, {progress.tokens:,} tokens)")
        self.config, changed = budget_change(saved, self.config, self.tokens_per_step, progress.step, self.echo)
        self.dist.on_main(lambda: save_run_config(self.run_dir, self.model_config, self.config))
        return events + changed

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.seq_len * self.config.grad_accum * self.world_size

    @property
    def total_steps(self) -> int | None:
        return budget_steps(self.config, self.tokens_per_step)

    def fraction_done(self) -> float:
        minutes = self.config.minutes
        return self.progress.step / self.total_steps if minutes is None else self.progress.elapsed / (60.0 * minutes)

    def budget_allows_step(self) -> bool:
        """Steps and tokens count exactly; a time budget stops before a step that, with the validation or
        checkpoint due after it, is expected to overrun it. Every rank decides alike: the times are agreed."""
        if self.config.minutes is None:
            return self.fraction_done() < 1.0
        estimate = self.loop_times.estimate(*self._due_after(self.progress.step + 1))
        return time_allows_step(self.progress.elapsed, 60.0 * self.config.minutes, estimate)

    def _due_after(self, step: int) -> tuple[bool, bool]:
        """Whether a validation and a checkpoint follow step `step` (1-based)."""
        validates = bool(self.val_batches) and step % self.config.eval_every == 0
        return validates, step % self.config.checkpoint_every == 0

    def train(self) -> dict[str, Any]:
        if self.config.steps is None and self.config.tokens is None and self.config.minutes is None:
            raise ValueError("give a training budget: --steps, --tokens or --minutes.")
        start = {"event": "start", "step": self.progress.step, "params": self.model.num_parameters()}
        start.update(tokens_per_step=self.tokens_per_step, device=str(self.device))
        if self.dist.enabled:
            start.update(world_size=self.world_size, parallel=self.config.parallel)
        self._log(start)
        try:
            self._train_loop()
            if not self._stop_requested and self.val_batches and self.progress.step % self.config.eval_every:
                self._validate()
            path = self._checkpoint(final=True)
            if self._stop_requested:
                self.echo(f"stopped at step {self.progress.step}; checkpoint {path.name} saved. Resume with --resume.")
            return self._write_summary(interrupted=self._stop_requested)
        finally:
            # Drop the DDP wrapper before leaving the group: were its C++ reducer the group's last owner, freeing
            # it would tear the group down while holding the GIL and deadlock with gloo's worker threads.
            self.engine = self.model
            self.dist.close()

    def _train_loop(self) -> None:
        progress = self.progress
        self.display.open(self.total_steps, progress.step, progress.elapsed)
        # SIGTERM, and Ctrl-C with several ranks (one stopped mid-collective could never checkpoint), stop cleanly.
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT) if self.dist.enabled else (signal.SIGTERM,):
            with contextlib.suppress(ValueError):  # not in the main thread
                previous[signum] = signal.signal(signum, lambda *_: self.request_stop())
        try:
            mark = time.perf_counter()
            while self.budget_allows_step() and not self._stop_requested:
                record = self._train_step()
                now = time.perf_counter()
                # This step and the last logging; ranks agree on the slowest's time and stop together (or one hangs).
                seconds, stop = self.dist.all_reduce([now - mark, float(self._stop_requested)], op="max")
                self._stop_requested = stop > 0
                progress.elapsed += seconds
                self.loop_times.add_step(seconds)
                mark = now
                ran = self._after_step(record)
                if ran:  # validated or checkpointed (every rank alike): that time counts too, agreed by all ranks
                    mark = time.perf_counter()
                    *durations, spent = self.dist.all_reduce([*ran.values(), mark - now], op="max")
                    progress.elapsed += spent
                    for add_time, seconds in zip(ran, durations, strict=True):
                        add_time(seconds)
                self.display.show(record, self.last_val, progress.elapsed, self.fraction_done(), time.perf_counter())
        except KeyboardInterrupt:
            self._stop_requested = True
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.display.close()

    def _train_step(self) -> dict[str, Any]:
        cfg, model, progress = self.config, self.model, self.progress
        fraction = self.fraction_done()
        shape = dict(
            warmup=cfg.warmup, warmup_steps=cfg.warmup_steps, cooldown=cfg.cooldown, min_ratio=cfg.min_lr_ratio
        )
        multiplier = scheduled_lr(progress.step, fraction, self.total_steps, cfg.schedule, **shape)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier
            if group["algorithm"] == "muon":
                group["momentum"] = muon_momentum(progress.step, final=cfg.muon_momentum)
                group["weight_decay"] = muon_weight_decay(fraction, cfg.muon_weight_decay)
        model.train()
        losses, metrics = [], []
        for micro in range(cfg.grad_accum):
            inputs, labels = (t.to(self.device, non_blocking=True) for t in self.packer.next_batch())
            with self.dist.gradient_sync(self.engine, enabled=micro == cfg.grad_accum - 1):
                with self._autocast():
                    out = self.engine(inputs, labels=labels, step=progress.micro_step, return_logits=False)
                progress.micro_step += 1
                progress.tokens += inputs.numel() * self.world_size
                loss = out.loss.float()
                losses.append(loss.item())
                metrics.append(out.metrics)  # also of a non-finite step: ‖h_T‖ is what diagnoses it
                # Backward through a non-finite loss too: every rank must join the same gradient reductions.
                (loss / cfg.grad_accum).backward()
        if self.on_backward is not None:
            self.on_backward(progress.step, model)
        params = [p for p in model.parameters() if p.grad is not None]
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = self.dist.clip_grad_norm(params, clip) if params else float("nan")
        # One all-reduce: all ranks log the global mean loss and skip when any saw a non-finite loss or gradient.
        finite = [value for value in losses if math.isfinite(value)]
        nonfinite = len(finite) < len(losses) or not math.isfinite(grad_norm)
        loss_sum, count, bad = self.dist.all_reduce([sum(finite), len(finite), nonfinite])
        skipped = bad > 0
        if not skipped:
            self.optimizer.step()
        progress.skipped += int(skipped)
        self.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        mean_loss = loss_sum / count if count else float("nan")
        record: dict[str, Any] = {"step": progress.step, "loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"]}
        record.update(grad_norm=grad_norm, tokens=progress.tokens, skipped=skipped)
        if self.model_config.is_looped:  # this rank's own loop telemetry (a fixed-depth Transformer has none)
            record.update(loop_metrics(metrics))
        return record

    def _after_step(self, record: dict[str, Any]) -> dict[Callable[[float], None], float]:
        """Guardrails, logging, and the due validation and checkpoint: their seconds, keyed by LoopTimes' recorder."""
        progress = self.progress
        record["tok_per_s"] = progress.tokens / max(progress.elapsed, 1e-9)
        if record["skipped"]:
            self._log({**record, "event": "skip"})
            self.echo(f"step {progress.step}: non-finite loss or gradient, step skipped ({progress.skipped} so far)")
        else:
            mean = self.guards.loss_ema
            spike = self.guards.check_spike(record)
            if spike is not None:
                self._log({"event": "spike", "step": progress.step, "loss": record["loss"], "mean": mean})
                self.echo(spike)
                if self.config.rollback_on_spike:
                    self._rollback()
        self.guards.check_skips(record)
        error = None if record["skipped"] else self.guards.divergence(record)
        if error or progress.step % self.config.log_every == 0 or progress.step == 1:  # a fatal step is logged too
            self._log(record)
        if error:
            raise TrainingError(error)
        times = self.loop_times
        tasks = {self._validate: times.add_validation, self._checkpoint: times.add_checkpoint}
        ran: dict[Callable[[float], None], float] = {}
        for (task, add_time), due in zip(tasks.items(), self._due_after(progress.step), strict=True):
            if due:
                started = time.perf_counter()
                task()
                ran[add_time] = time.perf_counter() - started
        return ran

    def _rollback(self) -> None:
        """Restore model and optimiser from the latest checkpoint; the data stream keeps moving forward."""
        if self.progress.rollbacks >= self.config.max_rollbacks:
            raise TrainingError(f"loss spiked again after {self.progress.rollbacks} rollbacks; stopping.")
        path = self.dist.on_main(self.checkpoints.latest)
        if path is None:
            self.echo("no checkpoint to roll back to yet; continuing.")
            return
        state = self.dist.load_checkpoint(self.checkpoints, path, self.model, self.optimizer)
        self.progress.rollbacks += 1
        self.guards.loss_ema = state.get("loss_ema")
        self._log({"event": "rollback", "step": self.progress.step, "to": path.name})
        self.echo(f"rolled back weights to {path.name}; the data stream continues from step {self.progress.step}.")

    def _validate(self) -> None:
        looped = self.model_config.is_looped
        depths = self.config.depths_to_evaluate(self.model_config.mean_recurrence)
        if not looped:
            depths = depths[:1]
        with self._autocast():  # DDP: the plain module (no gradient sync); FSDP: the sharded one, on every rank
            results = loss_by_depth(self.model, self.val_batches, depths, state_seed=self.config.seed)
        results = self.dist.reduce_depth_results(results)
        self.last_val = {r.depth: r.loss for r in results}
        entry: dict[str, Any] = {"event": "val", "step": self.progress.step, "val_loss": _by_depth(results, "loss")}
        if looped:
            entry.update(rho_A=self._spectral_radius(), state_norm=_by_depth(results, "state_norm"))
            entry["recurrent_residual"] = _by_depth(results, "residual")
        self._log(entry)

    def _spectral_radius(self) -> float | None:
        """ρ(Ā) of a looped model (with FSDP the injection's shards are gathered: every rank must call this)."""
        if not self.model_config.is_looped:
            return None
        with self.dist.full_parameters(self.model):
            return float(self.model.injection.spectral_radius())

    def _checkpoint(self, final: bool = False) -> Path | None:
        """This step's checkpoint (a final one not saved twice). A failed periodic write (disk full, …) keeps earlier
        ones and training goes on; MAX_CHECKPOINT_FAILURES in a row stop it, as going on grows what a crash loses."""
        step = self.progress.step
        if final and self._checkpointed is not None and self._checkpointed[0] == step:
            return self._checkpointed[1]
        packers = self.dist.all_gather_object(self.packer.state_dict())  # every rank's data position
        data = {"packers": packers} if self.dist.enabled else {"packer": packers[0]}
        rng = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
        state = {"progress": dict(vars(self.progress)), **data, "loss_ema": self.guards.loss_ema, "rng": rng}
        state["last_val"] = {str(k): v for k, v in self.last_val.items()}  # `_resume` reads all this back
        try:
            path = self.dist.save_checkpoint(self.checkpoints, step, self.model, self.optimizer, state)
        except CheckpointWriteError as err:
            if not final:
                self._checkpoint_failures += 1
                self._log({"event": "checkpoint_failed", "step": step, "error": str(err)})
                if self._checkpoint_failures < MAX_CHECKPOINT_FAILURES:
                    retry = step + self.config.checkpoint_every
                    self.echo(f"warning: {err}. Training continues; the next checkpoint is tried at step {retry}.")
                    return None
            failures = "" if final else f" ({self._checkpoint_failures} checkpoint writes failed in a row; stopping)"
            latest = self.checkpoints.latest()
            hint = f"; once the cause is fixed, --resume {self.run_dir} continues from {latest.name}" if latest else ""
            raise CheckpointWriteError(f"{err}{failures}{hint}") from None
        self._checkpoint_failures = 0
        self._checkpointed = (step, path)
        self._log({"event": "checkpoint", "step": step, "path": path.name})
        return path

    def _write_summary(self, interrupted: bool) -> dict[str, Any]:
        progress = self.progress
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "steps": progress.step, "tokens": progress.tokens}
        summary["train_seconds"] = round(progress.elapsed, 2)  # the time a --minutes budget counts
        summary["wall_seconds"] = round(time.perf_counter() - self._started, 2)  # this process, setup included
        summary["skipped_steps"] = progress.skipped
        summary["final_val_loss"] = {str(k): v for k, v in self.last_val.items()} or None
        if self.validation_note:
            summary["validation"] = self.validation_note
        summary.update(interrupted=interrupted, latest_checkpoint=str(self.checkpoints.latest()))
        if self.metrics_file is not None:
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            self.metrics_file.close()
        return summary

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

    def request_stop(self) -> None:
        self._stop_requested = True


def _by_depth(results: list[DepthResult], field: str) -> dict[str, Any]:
    return {str(r.depth): getattr(r, field) for r in results}
