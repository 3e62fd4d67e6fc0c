"""isoFLOP sweeps (README § Scaling laws): a JSON plan of budgets × recurrences, its runs trained resumably, and
one results CSV of their losses at every eval depth (with N(μ_rec) as `params`, so the fits need nothing else).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model.config import ParcaeConfig
from ..train.config import RUN_CONFIG, TrainConfig, load_run_config
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
        return ParcaeConfig.from_dict(
            {**self.model, "mean_recurrence": run.mean_recurrence, "backprop_depth": run.backprop_depth}
        )

    def train_config(self, run: PlannedRun, data: str | None = None) -> TrainConfig:
        data_field = {} if data is None else {"data": data}
        return TrainConfig(**{**self.train, "steps": run.steps, **data_field})

    @property
    def seq_len(self) -> int:
        return int(self.train.get("seq_len") or self.model["max_seq_len"])

    def runs_path(self, plan_path: str | Path) -> Path:
        root = Path(self.runs_dir)
        return root if root.is_absolute() else Path(plan_path).parent / root

    def to_dict(self) -> dict[str, Any]:
        tokens_per_step = int(self.train["batch_size"]) * int(self.train["grad_accum"]) * self.seq_len
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "train": self.train,
            "eval_batches": self.eval_batches,
            "runs_dir": self.runs_dir,
            "total_flops": sum(r.steps * tokens_per_step * r.flops_per_token for r in self.runs),
            "runs": [{**dataclasses.asdict(r), "eval_depths": list(r.eval_depths)} for r in self.runs],
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SweepPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sweep plan {path} not found.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"{path} is not a sweep plan (make one with `parcae sweep plan`).")
        try:
            runs = tuple(PlannedRun(**{**r, "eval_depths": tuple(r["eval_depths"])}) for r in data["runs"])
            plan = cls(data["model"], data["train"], runs, int(data["eval_batches"]), str(data["runs_dir"]))
            for run in plan.runs:  # validates the configs once, with a clear message
                plan.model_config(run), plan.train_config(run)
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
    """A budgets × recurrences grid. Training-side validation is switched off (the runner evaluates each run
    once, at the end); every run is evaluated at `eval_depths` (default: the paper's 1, 2, 4, 6, …, 24 up to
    2·max μ_rec) plus its own μ_rec."""
    if not model_cfg.is_looped:
        raise ValueError(f"an isoFLOP sweep over recurrences needs a looped model; {model_cfg.name} has n_core = 0.")
    if not budgets or any(not (b > 0 and math.isfinite(b)) for b in budgets):
        raise ValueError(f"budgets must be positive FLOP counts, got {list(budgets)}.")
    if not recurrences or any(r < 1 for r in recurrences):
        raise ValueError(f"recurrences must be positive integers, got {list(recurrences)}.")
    if len(set(budgets)) != len(budgets) or len(set(recurrences)) != len(recurrences):
        raise ValueError("budgets and recurrences must not repeat.")
    if eval_batches < 1:
        raise ValueError(f"eval_batches must be at least 1, got {eval_batches}.")
    if eval_depths is None:
        eval_depths = [t for t in PAPER_EVAL_DEPTHS if t <= 2 * max(recurrences)]
    if any(t < 1 for t in eval_depths):
        raise ValueError(f"eval depths must be positive, got {list(eval_depths)}.")
    train_cfg = dataclasses.replace(train_cfg, steps=None, tokens=None, minutes=None, eval_batches=0)
    if Path(train_cfg.data).exists():  # a local path: absolute, so the plan works from any directory
        train_cfg = dataclasses.replace(train_cfg, data=str(Path(train_cfg.data).resolve()))
    seq_len = train_cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}.")
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum * seq_len
    runs = []
    for budget in sorted(budgets):
        for mean in sorted(recurrences):
            cfg = model_cfg.replace(mean_recurrence=mean, backprop_depth=math.ceil(mean / 2))
            per_token = flops_per_token(cfg, seq_len).total
            steps = round(budget / per_token / tokens_per_step)
            if steps < 1:
                raise ValueError(
                    f"budget {budget:.3g} FLOPs at μ_rec {mean} is {budget / per_token:,.0f} tokens, less than one "
                    f"step of {tokens_per_step:,} tokens; raise the budget or lower batch_size × seq_len."
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


# ---------------------------------------------------------------------- running
def run_state(run_dir: Path) -> str:
    """'done', 'interrupted' (has a checkpoint to resume from), 'partial' (started, no checkpoint) or 'new'."""
    from ..train.checkpoint import CheckpointManager
    from ..train.trainer import SUMMARY_FILE

    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        try:
            interrupted = json.loads(summary.read_text()).get("interrupted", True)
        except json.JSONDecodeError:
            interrupted = True
        if not interrupted:
            return "done"
    if not (run_dir / RUN_CONFIG).is_file():
        return "new"
    return "interrupted" if CheckpointManager(run_dir).latest() is not None else "partial"


def _check_same_run(run_dir: Path, model_cfg: ParcaeConfig, train_cfg: TrainConfig) -> None:
    saved_model, saved_train = load_run_config(run_dir)
    # The data path is left out: it is the sweep's own prepared copy, whose absolute path moves with the sweep.
    same_train = dataclasses.replace(saved_train, data=train_cfg.data) == train_cfg
    if saved_model.to_dict() != model_cfg.to_dict() or not same_train:
        raise ValueError(
            f"{run_dir} holds a run configured differently from the plan; move it away or plan into another "
            "runs directory."
        )


def _set_aside(run_dir: Path, echo: Echo) -> None:
    """A run that started but never checkpointed cannot resume: keep its files under a new name, start over."""
    k = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.incomplete-{k}")).exists():
        k += 1
    run_dir.rename(aside)
    echo(f"{run_dir.name}: started earlier but has no checkpoint; moved to {aside.name}, starting again.")


def _prepared_data(plan: SweepPlan, runs_dir: Path, echo: Echo) -> str:
    """The plan's data as a prepared directory, tokenized once for the whole sweep."""
    from ..data.shards import is_prepared, prepare
    from ..data.tokenizer import get_tokenizer

    spec = str(plan.train["data"])
    if is_prepared(spec):
        return str(Path(spec).resolve())
    target = runs_dir / "data"
    if not is_prepared(target):
        echo(f"tokenizing {spec} into {target} (once for the sweep) …")
        options = {"text_field": plan.train["text_field"], "val_fraction": plan.train["val_fraction"]}
        prepare(spec, get_tokenizer(plan.train["tokenizer"]), target, **options, progress=False)
    return str(target.resolve())


def read_result_runs(path: Path) -> set[str]:
    """Run names already in a results CSV (whose header must be exactly RESULT_COLUMNS)."""
    if not path.is_file():
        return set()
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return set()
        if tuple(header) != RESULT_COLUMNS:
            raise ValueError(f"{path} exists with other columns than {','.join(RESULT_COLUMNS)}; move it away.")
        return {row[0] for row in reader if row}


def _append_rows(path: Path, rows: list[list[Any]]) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(RESULT_COLUMNS)
        writer.writerows(rows)  # one write per run, so a crash never leaves half a run's rows


def run_sweep(
    plan_path: str | Path, *, echo: Echo = print, emit: bool = False, nproc: int = 1, progress_bar: bool = False
) -> Path:
    """Train every unfinished run of the plan, then evaluate every run not yet in the results CSV (returned).

    With `emit`, nothing is trained: the `torchrun` command of every unfinished run is printed (its config written
    to RUNS/configs/NAME.yaml), then the command that evaluates them afterwards."""
    from ..train.trainer import Trainer

    plan_path = Path(plan_path)
    plan = SweepPlan.load(plan_path)
    runs_dir = plan.runs_path(plan_path)
    runs_dir.mkdir(parents=True, exist_ok=True)
    results = runs_dir / RESULTS_FILE
    done_rows = read_result_runs(results)
    data = _prepared_data(plan, runs_dir, echo)
    validation: list = []  # the same validation batches for every run, read once
    pending = False
    for index, run in enumerate(plan.runs, 1):
        run_dir = runs_dir / run.name
        model_cfg, train_cfg = plan.model_config(run), plan.train_config(run, data)
        state = run_state(run_dir)
        if state != "new":
            _check_same_run(run_dir, model_cfg, train_cfg)
        if state == "partial":
            _set_aside(run_dir, echo)
            state = "new"
        if emit:
            if state != "done":
                echo(_torchrun_command(run_dir, model_cfg, train_cfg, state, nproc))
            continue
        tag = f"[{index}/{len(plan.runs)}] {run.name}"
        if state == "done":
            echo(f"{tag}: already trained, skipped")
        else:
            verb = "resuming" if state == "interrupted" else "training"
            echo(f"{tag}: {verb} ({run.steps:,} steps, {run.tokens:,} tokens)")
            started = time.perf_counter()
            if state == "interrupted":
                trainer = Trainer(None, None, run_dir, resume=True, progress_bar=progress_bar, echo=echo)
            else:
                trainer = Trainer(model_cfg, train_cfg, run_dir, progress_bar=progress_bar, echo=echo)
            if trainer.train()["interrupted"]:
                echo(f"{tag}: stopped; rerun `parcae sweep run {plan_path}` to resume the sweep.")
                return results
            echo(f"{tag}: trained in {time.perf_counter() - started:.1f} s")
        if run.name not in done_rows:
            pending = True
            _evaluate_run(plan, run, runs_dir, data, validation, echo, tag)
    if emit:
        echo(f"# afterwards, evaluate every run into {results}:")
        echo(f"parcae sweep run {shlex.quote(str(plan_path))}")
    elif not pending:
        echo(f"every run is already evaluated in {results}")
    return results


def _torchrun_command(run_dir: Path, model_cfg: ParcaeConfig, train_cfg: TrainConfig, state: str, nproc: int) -> str:
    launcher = f"torchrun --nproc-per-node {nproc} -m parcae train"
    if state == "interrupted":
        return f"{launcher} --resume {shlex.quote(str(run_dir))} --no-progress"
    import yaml

    configs = run_dir.parent / "configs"
    configs.mkdir(exist_ok=True)
    # YAML, not JSON: `parcae train --config` parses with YAML 1.1, which reads JSON's 1e-05 as a string.
    config_file = configs / f"{run_dir.name}.yaml"
    config_file.write_text(
        yaml.safe_dump({"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}, sort_keys=False)
    )
    return f"{launcher} --config {shlex.quote(str(config_file))} --out {shlex.quote(str(run_dir))} --no-progress"


def _evaluate_run(
    plan: SweepPlan, run: PlannedRun, runs_dir: Path, data: str, validation: list, echo: Echo, tag: str
) -> None:
    """The run's loss at each of its eval depths, appended to the results CSV."""
    from ..data.packing import val_batches
    from ..data.shards import ShardStore
    from ..device import resolve_device
    from ..eval.loss import loss_by_depth
    from ..train.run import open_run
    from ..train.trainer import SUMMARY_FILE

    run_dir = runs_dir / run.name
    loaded = open_run(run_dir, device=resolve_device(str(plan.train["device"])))
    if not validation:
        store, batch_size = ShardStore.open(data, "val"), int(plan.train["batch_size"])
        validation += val_batches(store, plan.seq_len, batch_size, plan.eval_batches, pad_id=loaded.tokenizer.pad_id)
    started = time.perf_counter()
    depth_results = loss_by_depth(loaded.model, validation, list(run.eval_depths))
    seconds = time.perf_counter() - started
    tokens = json.loads((run_dir / SUMMARY_FILE).read_text())["tokens"]
    fixed = [run.name, run.params, f"{run.budget_flops:.6g}", run.mean_recurrence, run.backprop_depth, tokens]
    _append_rows(runs_dir / RESULTS_FILE, [[*fixed, r.depth, repr(float(r.loss))] for r in depth_results])
    at_mean = {r.depth: r.loss for r in depth_results}[run.mean_recurrence]
    depths = ",".join(map(str, run.eval_depths))
    echo(f"{tag}: evaluated at T = {depths} in {seconds:.1f} s; val loss {at_mean:.4f} at T = μ_rec")


def estimate_seconds(plan: SweepPlan, probe_steps: int = 5, echo: Echo = print) -> float:
    """Wall time of the whole plan on this machine, from a few timed training steps per μ_rec on random tokens
    (median) and timed evaluation forwards at the smallest and largest depth (linear in T in between)."""
    import torch

    from ..model.parcae import Parcae
    from ..train.optim import build_optimizer

    batch_size, seq_len, accum = int(plan.train["batch_size"]), plan.seq_len, int(plan.train["grad_accum"])
    step_seconds: dict[int, float] = {}
    eval_seconds: dict[int, tuple[float, float, int, int]] = {}
    for run in plan.runs:
        if run.mean_recurrence in step_seconds:
            continue
        cfg = plan.model_config(run)
        model = Parcae(cfg)
        optimizer = build_optimizer(model, plan.train_config(run))
        ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len))
        times = []
        for step in range(probe_steps + 1):  # the first step warms up allocators and kernels
            started = time.perf_counter()
            for _ in range(accum):
                model(ids, labels=ids, step=step, return_logits=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
        step_seconds[run.mean_recurrence] = statistics.median(times[1:])
        model.eval()
        low, high = min(run.eval_depths), max(run.eval_depths)
        timed = []
        with torch.no_grad():
            for depth in (low, high):
                model(ids, labels=ids, num_steps=depth, return_logits=False)  # warm-up
                started = time.perf_counter()
                model(ids, labels=ids, num_steps=depth, return_logits=False)
                timed.append(time.perf_counter() - started)
        eval_seconds[run.mean_recurrence] = (timed[0], timed[1], low, high)
        timing = f"eval forward {timed[0]:.3f} s at T = {low}, {timed[1]:.3f} s at T = {high}"
        echo(f"μ_rec {run.mean_recurrence}: {step_seconds[run.mean_recurrence]:.3f} s/step, {timing}")
    total = 0.0
    for run in plan.runs:
        low_s, high_s, low, high = eval_seconds[run.mean_recurrence]
        slope = (high_s - low_s) / (high - low) if high > low else 0.0
        per_batch = sum(low_s + slope * (t - low) for t in run.eval_depths)
        total += run.steps * step_seconds[run.mean_recurrence] + plan.eval_batches * per_batch
    return total
