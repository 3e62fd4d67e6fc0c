"""isoFLOP sweeps (README § Scaling laws): a JSON plan of budgets × recurrences, its runs trained resumably, and one
results CSV of their losses at every eval depth (with N(μ_rec) as `params`, so the fits need nothing else)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..data.packing import val_batches
from ..data.shards import ShardStore, prepare_once
from ..device import resolve_device
from ..eval.loss import loss_by_depth
from ..model.config import ParcaeConfig
from ..model.parcae import Parcae
from ..train.checkpoint import CheckpointManager
from ..train.config import RUN_CONFIG, TrainConfig, load_run_config
from ..train.optim import build_optimizer
from ..train.run import open_run
from ..train.trainer import SUMMARY_FILE, Trainer
from .flops import effective_params, flops_per_token, official_flops_per_token

PLAN_FORMAT = "parcae-sweep-plan"
PLAN_VERSION = 1
RESULT_COLUMNS: tuple[str, ...] = ("run", "params", "budget_flops", "mean_recurrence", "backprop_depth", "tokens")
RESULT_COLUMNS += ("eval_depth", "val_loss")
RESULTS_FILE = "results.csv"
# The test-time depths at which the paper evaluates its isoFLOP models for the unified law (its Eq. 4).
PAPER_EVAL_DEPTHS = (1, 2, 4, 6, 8, 10, 12, 16, 20, 24)

Echo = Callable[[str], None]


@dataclass(frozen=True)
class PlannedRun:
    name: str
    budget_flops: float
    mean_recurrence: int
    backprop_depth: int
    flops_per_token: float  # ours (expected iterations); tokens are planned from it
    official_flops_per_token: int  # the official cost.py figure, for comparison
    steps: int
    tokens: int  # steps × tokens per step: what the run will train on
    params: int  # N(μ_rec), the unrolled parameter count
    eval_depths: tuple[int, ...]


@dataclass(frozen=True)
class SweepPlan:
    model: dict[str, Any]  # the base ParcaeConfig (μ_rec and μ_bwd are set per run)
    train: dict[str, Any]  # the base TrainConfig, without a budget (each run gets `steps`)
    runs: tuple[PlannedRun, ...]
    eval_batches: int  # validation batches per evaluation (batch_size × seq_len tokens each)
    runs_dir: str  # where runs and results go; relative paths are relative to the plan file

    def model_config(self, run: PlannedRun) -> ParcaeConfig:
        depth = {"mean_recurrence": run.mean_recurrence, "backprop_depth": run.backprop_depth}
        return ParcaeConfig.from_dict({**self.model, **depth})

    def train_config(self, run: PlannedRun, data: str | None = None) -> TrainConfig:
        return TrainConfig(**{**self.train, "steps": run.steps, "data": self.train["data"] if data is None else data})

    @property
    def seq_len(self) -> int:
        return int(self.train.get("seq_len") or self.model["max_seq_len"])

    def runs_path(self, plan_path: str | Path) -> Path:
        return Path(plan_path).parent / self.runs_dir  # an absolute runs_dir replaces the plan's folder

    def to_dict(self) -> dict[str, Any]:
        out = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model": self.model, "train": self.train}
        out.update(eval_batches=self.eval_batches, runs_dir=self.runs_dir)
        out["total_flops"] = sum(r.tokens * r.flops_per_token for r in self.runs)
        out["runs"] = [{**dataclasses.asdict(r), "eval_depths": list(r.eval_depths)} for r in self.runs]
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SweepPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sweep plan {path} not found.")
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
                raise ValueError(f"{path} is not a sweep plan (make one with `parcae sweep plan`).")
            runs = tuple(PlannedRun(**{**r, "eval_depths": tuple(r["eval_depths"])}) for r in data["runs"])
            plan = cls(data["model"], data["train"], runs, int(data["eval_batches"]), str(data["runs_dir"]))
            for run in plan.runs:  # validates the configs once, with a clear message
                plan.model_config(run), plan.train_config(run)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        except (KeyError, TypeError) as err:
            raise ValueError(f"sweep plan {path} is incomplete or malformed ({err}).") from None
        return plan


def make_plan(
    model_cfg: ParcaeConfig,
    train_cfg: TrainConfig,
    budgets: Sequence[float],
    recurrences: Sequence[int],
    *,
    eval_depths: Sequence[int] | None = None,
    eval_batches: int = 16,
    runs_dir: str = "runs",
) -> SweepPlan:
    """A budgets × recurrences grid, evaluated once per run by the runner (training-side validation is off) at
    `eval_depths` (default: the paper's 1, 2, 4, 6, …, 24 up to 2·max μ_rec) plus the run's own μ_rec."""
    if not model_cfg.is_looped:
        raise ValueError(f"an isoFLOP sweep over recurrences needs a looped model; {model_cfg.name} has n_core = 0.")
    if not budgets or len(set(budgets)) != len(budgets) or any(not (b > 0 and math.isfinite(b)) for b in budgets):
        raise ValueError(f"budgets must be positive FLOP counts and must not repeat, got {list(budgets)}.")
    if not recurrences or len(set(recurrences)) != len(recurrences) or any(r < 1 for r in recurrences):
        raise ValueError(f"recurrences must be positive integers and must not repeat, got {list(recurrences)}.")
    if eval_batches < 1:
        raise ValueError(f"eval_batches must be at least 1, got {eval_batches}.")
    if eval_depths is None:
        eval_depths = [t for t in PAPER_EVAL_DEPTHS if t <= 2 * max(recurrences)]
    if any(t < 1 for t in eval_depths):
        raise ValueError(f"eval depths must be positive, got {list(eval_depths)}.")
    local = Path(train_cfg.data)  # a local path is made absolute, so the plan works from any directory
    data = str(local.resolve()) if local.exists() else train_cfg.data
    train_cfg = dataclasses.replace(train_cfg, data=data, steps=None, tokens=None, minutes=None, eval_batches=0)
    seq_len = train_cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}.")
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum * seq_len
    runs = []
    for budget, mean in itertools.product(sorted(budgets), sorted(recurrences)):
        cfg = model_cfg.replace(mean_recurrence=mean, backprop_depth=math.ceil(mean / 2))
        per_token = flops_per_token(cfg, seq_len).total
        steps = round(budget / per_token / tokens_per_step)
        if steps < 1:
            raise ValueError(
                f"budget {budget:.3g} FLOPs at μ_rec {mean} is {budget / per_token:,.0f} tokens, less than one step "
                f"of {tokens_per_step:,} tokens; raise the budget or lower batch_size × seq_len."
            )
        name = f"C{budget:.4g}".replace("+", "") + f"-mu{mean:02d}"
        official, tokens = official_flops_per_token(cfg, seq_len), steps * tokens_per_step
        run = (name, float(budget), mean, cfg.backprop_depth, per_token, official, steps, tokens)
        runs.append(PlannedRun(*run, effective_params(cfg), tuple(sorted({*eval_depths, mean}))))
    return SweepPlan(model_cfg.to_dict(), train_cfg.to_dict(), tuple(runs), eval_batches, runs_dir)


def format_plan(plan: SweepPlan) -> str:
    lines = [f"{'run':<18} {'μ_rec':>5} {'μ_bwd':>5} {'FLOPs/token':>13} {'official':>13} {'steps':>7} {'tokens':>12}"]
    for r in plan.runs:
        lines.append(
            f"{r.name:<18} {r.mean_recurrence:>5} {r.backprop_depth:>5} {r.flops_per_token:>13,.0f} "
            f"{r.official_flops_per_token:>13,} {r.steps:>7,} {r.tokens:>12,}"
        )
    return "\n".join(lines)


def run_state(run_dir: Path) -> str:
    """'done', 'interrupted' (has a checkpoint to resume from), 'partial' (started, no checkpoint) or 'new'."""
    with suppress(OSError, json.JSONDecodeError):
        if not json.loads((run_dir / SUMMARY_FILE).read_text()).get("interrupted", True):
            return "done"
    if not (run_dir / RUN_CONFIG).is_file():
        return "new"
    return "interrupted" if CheckpointManager(run_dir).latest() is not None else "partial"


def _checked_state(run_dir: Path, model_cfg: ParcaeConfig, train_cfg: TrainConfig, echo: Echo) -> str:
    """`run_state`, after checking an existing run is the planned one; one with no checkpoint is moved aside ('new')."""
    state = run_state(run_dir)
    if state == "new":
        return state
    saved_model, saved_train = load_run_config(run_dir)
    # The data path is left out: it is the sweep's own prepared copy, whose absolute path moves with the sweep.
    same_train = dataclasses.replace(saved_train, data=train_cfg.data) == train_cfg
    if saved_model.to_dict() != model_cfg.to_dict() or not same_train:
        raise ValueError(f"{run_dir} holds a run that differs from the plan; move it away or use another runs dir.")
    if state != "partial":
        return state
    asides = (run_dir.with_name(f"{run_dir.name}.incomplete-{k}") for k in itertools.count(1))
    aside = next(path for path in asides if not path.exists())
    run_dir.rename(aside)
    echo(f"{run_dir.name}: started earlier but has no checkpoint; moved to {aside.name}, starting again.")
    return "new"


def read_result_runs(path: Path) -> set[str]:
    """Run names already in a results CSV (whose header must be exactly RESULT_COLUMNS)."""
    if not path.is_file():
        return set()
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if rows and tuple(rows[0]) != RESULT_COLUMNS:
        raise ValueError(f"{path} exists with other columns than {','.join(RESULT_COLUMNS)}; move it away.")
    return {row[0] for row in rows[1:] if row}


def run_sweep(
    plan_path: str | Path, *, echo: Echo = print, emit: bool = False, nproc: int = 1, progress_bar: bool = False
) -> Path:
    """Train every unfinished run of the plan, then evaluate every run not yet in the results CSV (returned); with
    `emit`, print each unfinished run's `torchrun` command (config in RUNS/configs/NAME.yaml) instead of training."""
    plan_path = Path(plan_path)
    plan = SweepPlan.load(plan_path)
    runs_dir = plan.runs_path(plan_path)
    runs_dir.mkdir(parents=True, exist_ok=True)
    results = runs_dir / RESULTS_FILE
    done_rows = read_result_runs(results)
    options = {"text_field": plan.train["text_field"], "val_fraction": plan.train["val_fraction"]}
    spec, tokenizer = str(plan.train["data"]), plan.train["tokenizer"]
    data = str(prepare_once(spec, runs_dir / "data", tokenizer, echo, "the sweep", **options))
    validation: list = []  # the same validation batches for every run, read once
    for index, run in enumerate(plan.runs, 1):
        run_dir = runs_dir / run.name
        model_cfg, train_cfg = plan.model_config(run), plan.train_config(run, data)
        state = _checked_state(run_dir, model_cfg, train_cfg, echo)
        if emit:
            if state != "done":
                echo(_torchrun_command(run_dir, model_cfg, train_cfg, state, nproc))
            continue
        tag = f"[{index}/{len(plan.runs)}] {run.name}"
        if state == "done":
            echo(f"{tag}: already trained, skipped")
        else:
            resume = state == "interrupted"
            echo(f"{tag}: {'resuming' if resume else 'training'} ({run.steps:,} steps, {run.tokens:,} tokens)")
            started = time.perf_counter()
            configs = (None, None) if resume else (model_cfg, train_cfg)
            if Trainer(*configs, run_dir, resume=resume, progress_bar=progress_bar, echo=echo).train()["interrupted"]:
                echo(f"{tag}: stopped; rerun `parcae sweep run {plan_path}` to resume the sweep.")
                return results
            echo(f"{tag}: trained in {time.perf_counter() - started:.1f} s")
        if run.name not in done_rows:
            echo(f"{tag}: {_evaluate_run(plan, run, run_dir, data, validation)}")
    if emit:
        echo(f"# afterwards, evaluate every run into {results}:")
        echo(f"parcae sweep run {shlex.quote(str(plan_path))}")
    elif done_rows.issuperset(r.name for r in plan.runs):
        echo(f"every run is already evaluated in {results}")
    return results


def _torchrun_command(run_dir: Path, model_cfg: ParcaeConfig, train_cfg: TrainConfig, state: str, nproc: int) -> str:
    launcher = f"torchrun --nproc-per-node {nproc} -m parcae train"
    if state == "interrupted":
        return f"{launcher} --resume {shlex.quote(str(run_dir))} --no-progress"
    config_file = run_dir.parent / "configs" / f"{run_dir.name}.yaml"
    config_file.parent.mkdir(exist_ok=True)
    # YAML, not JSON: `parcae train --config` parses with YAML 1.1, which reads JSON's 1e-05 as a string.
    config = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return f"{launcher} --config {shlex.quote(str(config_file))} --out {shlex.quote(str(run_dir))} --no-progress"


def _evaluate_run(plan: SweepPlan, run: PlannedRun, run_dir: Path, data: str, validation: list) -> str:
    """The run's loss at each eval depth, appended to the results CSV at once (a crash never leaves half a run)."""
    loaded = open_run(run_dir, device=resolve_device(str(plan.train["device"])))
    if not validation:
        store, batch_size = ShardStore.open(data, "val"), int(plan.train["batch_size"])
        validation += val_batches(store, plan.seq_len, batch_size, plan.eval_batches, pad_id=loaded.tokenizer.pad_id)
    started = time.perf_counter()
    depth_results = loss_by_depth(loaded.model, validation, list(run.eval_depths))
    seconds = time.perf_counter() - started
    tokens = json.loads((run_dir / SUMMARY_FILE).read_text())["tokens"]
    fixed = [run.name, run.params, f"{run.budget_flops:.6g}", run.mean_recurrence, run.backprop_depth, tokens]
    rows = [[*fixed, r.depth, repr(float(r.loss))] for r in depth_results]
    results = run_dir.parent / RESULTS_FILE
    if not results.is_file() or results.stat().st_size == 0:
        rows.insert(0, list(RESULT_COLUMNS))
    with results.open("a", newline="") as handle:
        csv.writer(handle).writerows(rows)
    at_mean = {r.depth: r.loss for r in depth_results}[run.mean_recurrence]
    depths = ",".join(map(str, run.eval_depths))
    return f"evaluated at T = {depths} in {seconds:.1f} s; val loss {at_mean:.4f} at T = μ_rec"


def estimate_seconds(plan: SweepPlan, probe_steps: int = 5, echo: Echo = print) -> float:
    """The plan's wall time here: median timed steps per μ_rec on random tokens, evals timed at min / max T (linear)."""
    batch_size, seq_len, accum = int(plan.train["batch_size"]), plan.seq_len, int(plan.train["grad_accum"])
    timings: dict[int, tuple[float, float, float, int, int]] = {}  # per μ_rec: step, eval at low / high, low, high
    total = 0.0
    for run in plan.runs:  # timed at the first run of each μ_rec
        if run.mean_recurrence not in timings:
            model = Parcae(plan.model_config(run))
            optimizer = build_optimizer(model, plan.train_config(run))
            ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len))
            times = []
            for step in range(probe_steps + 1):  # the first step warms up allocators and kernels
                started = time.perf_counter()
                for _ in range(accum):
                    model(ids, labels=ids, step=step, return_logits=False).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - started)
            model.eval()
            low, high = min(run.eval_depths), max(run.eval_depths)
            timed = []
            with torch.no_grad():
                for depth in (low, high):
                    model(ids, labels=ids, num_steps=depth, return_logits=False)  # warm-up
                    started = time.perf_counter()
                    model(ids, labels=ids, num_steps=depth, return_logits=False)
                    timed.append(time.perf_counter() - started)
            timings[run.mean_recurrence] = (statistics.median(times[1:]), *timed, low, high)
            timing = f"eval forward {timed[0]:.3f} s at T = {low}, {timed[1]:.3f} s at T = {high}"
            echo(f"μ_rec {run.mean_recurrence}: {timings[run.mean_recurrence][0]:.3f} s/step, {timing}")
        step_s, low_s, high_s, low, high = timings[run.mean_recurrence]
        slope = (high_s - low_s) / (high - low) if high > low else 0.0
        per_batch = sum(low_s + slope * (t - low) for t in run.eval_depths)
        total += run.steps * step_s + plan.eval_batches * per_batch
    return total
