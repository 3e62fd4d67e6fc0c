"""The stability lab (README § Stability lab): the paper's stability findings (its Tables 2, 4 and 8) in miniature,
with the recipe of small reference runs of the official code, so that results are comparable."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.shards import prepare_once
from ..device import resolve_device
from ..eval.loss import loss_by_depth
from ..eval.stability import jacobian_spectrum
from ..model.config import INJECTIONS, ParcaeConfig, get_preset
from ..model.parcae import Parcae
from ..train.config import TrainConfig
from ..train.trainer import Trainer, TrainingError
from .stability_results import RunCurves, Thresholds, classify, fmt, norm_suffix, paper_prelude_norm, write_report

ABLATIONS = ("depth-sampling", "prelude-norm", "zoh")
PRELUDE_NORM_CHOICES = ("paper", "on", "off")
LAB_FILE = "lab.json"
RESULT_FILE = "lab_result.json"
# Model fields the lab sets per run; `model_overrides` may not touch them.
_GRID_FIELDS = ("injection", "prelude_norm", "mean_recurrence", "depth_sampling")
_POSITIVE_INTS = ("seeds", "steps", "batch_size", "seq_len", "eval_batches", "log_every")
_POSITIVE_INTS += ("jacobian_sequences", "jacobian_steps")


@dataclass(frozen=True)
class LabConfig:
    """The grid and its recipe. Defaults: the full lab, 12 runs × 200 steps (≈ 40–50 min on 2 cores, parcae-tiny)."""

    preset: str = "parcae-tiny"
    data: str = "stdlib"
    injections: tuple[str, ...] = ("diagonal", "add", "linear")
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    recurrences: tuple[int, ...] = ()  # μ_rec values; () = the preset's
    seeds: int = 1
    steps: int = 200
    warmup_steps: int = 20
    batch_size: int = 16
    seq_len: int = 128
    prelude_norm: str = "paper"  # paper (on for diagonal*, off for add/linear) | on | off
    ablations: tuple[str, ...] = ABLATIONS
    ablation_lr: float = 1e-2
    eval_batches: int = 4
    log_every: int = 5
    jacobian_every: int = 100  # 0: the final model only
    jacobian_sequences: int = 2
    jacobian_steps: int = 30  # Krylov steps per restart (1 restart)
    thresholds: Thresholds = field(default_factory=Thresholds)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"  # as `parcae train`: auto = cuda when available, else cpu; stored resolved (see below)

    def __post_init__(self) -> None:
        for name, kind in (("injections", str), ("lrs", float), ("recurrences", int), ("ablations", str)):
            object.__setattr__(self, name, tuple(map(kind, getattr(self, name))))
        if isinstance(self.thresholds, dict):
            object.__setattr__(self, "thresholds", Thresholds(**self.thresholds))
        # "auto" is stored as the device it picks: CUDA trains under bf16 autocast and the CPU in fp32, so a lab
        # continued elsewhere must not silently mix the two (lab.json then differs and the rerun is refused).
        # resolve_device also rejects an unknown or absent device here, before any data is tokenized.
        object.__setattr__(self, "device", str(resolve_device(self.device)))
        self._validate()

    def _validate(self) -> None:
        def fail(sentence: str) -> None:
            raise ValueError(f"Invalid stability lab: {sentence}")

        if not self.injections:
            fail("give at least one injection.")
        for name in self.injections:
            if name not in INJECTIONS:
                fail(f"unknown injection {name!r}; choose among {', '.join(INJECTIONS)}.")
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            fail(f"learning rates must be positive, got {list(self.lrs)}.")
        if any(r < 1 for r in self.recurrences):
            fail(f"recurrences must be positive, got {list(self.recurrences)}.")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}.")
        if not 0 <= self.warmup_steps < self.steps:
            fail(f"warmup_steps must lie in [0, steps), got {self.warmup_steps} for {self.steps} steps.")
        if self.jacobian_every < 0:
            fail(f"jacobian_every must be ≥ 0, got {self.jacobian_every}.")
        if self.prelude_norm not in PRELUDE_NORM_CHOICES:
            fail(f"prelude_norm must be one of {', '.join(PRELUDE_NORM_CHOICES)}, got {self.prelude_norm!r}.")
        unknown = sorted(set(self.ablations) - set(ABLATIONS))
        if unknown:
            fail(f"unknown ablation(s) {', '.join(unknown)}; choose among {', '.join(ABLATIONS)}.")
        if not self.ablation_lr > 0:
            fail(f"ablation_lr must be positive, got {self.ablation_lr}.")
        clash = sorted(set(self.model_overrides) & set(_GRID_FIELDS))
        if clash:
            fail(f"{', '.join(clash)} are set by the lab per run; use the lab's options instead.")
        if self.thresholds.max_state_rms <= 0 or self.thresholds.state_growth <= 1:
            fail("max_state_rms must be positive and state_growth above 1.")
        self.base_model()  # the preset and overrides must make a valid looped model

    def base_model(self) -> ParcaeConfig:
        cfg = get_preset(self.preset, **self.model_overrides)
        if not cfg.is_looped:
            raise ValueError(f"Invalid stability lab: preset {self.preset} has no loop (n_core = 0).")
        if self.seq_len > cfg.max_seq_len:
            raise ValueError(f"Invalid stability lab: seq_len {self.seq_len} exceeds max_seq_len {cfg.max_seq_len}.")
        return cfg

    @property
    def mean_recurrences(self) -> tuple[int, ...]:
        return self.recurrences or (self.base_model().mean_recurrence,)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples → lists, as read back from lab.json

    def describe(self) -> str:
        """The recipe and the divergence rule, for the report."""
        return (
            f"preset {self.preset}, data {self.data}, {self.steps} steps of {self.batch_size}×{self.seq_len} tokens, "
            f"AdamW (0.9, 0.95), no weight decay, {self.warmup_steps}-step warm-up then constant LR, clip 1.0; "
            f"prelude norm: {self.prelude_norm}; seeds {self.seeds}. "
            f"Diverged (✗) = nan | loss ≥ initial after warm-up | ‖h_T‖ > {self.thresholds.max_state_rms:g}·√d "
            f"(state-norm) | ‖h_2μ‖ > {self.thresholds.state_growth:g}·‖h_μ‖ (state-growth)."
        )


# Quick mode: two learning rates either side of where the concat RDM diverged in the official code's reference
# runs (fine at 1e-2, diverged at 3e-2), short runs, no ablations, the Jacobian on the final models only.
QUICK = {"lrs": (3e-3, 3e-2), "steps": 60, "warmup_steps": 10, "ablations": (), "jacobian_every": 0}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the lab."""

    injection: str
    lr: float
    mean_recurrence: int
    seed: int
    prelude_norm: bool
    depth_sampling: str = "per-sequence"
    depth_curve: bool = False  # evaluate the loss at every T = 1 … 2μ at the end (ablation runs)
    groups: tuple[str, ...] = ("grid",)

    @property
    def name(self) -> str:
        norm = norm_suffix(self.injection, self.prelude_norm, "+pn", "-pn")
        sampling = "" if self.depth_sampling == "per-sequence" else "-" + self.depth_sampling
        return f"{self.injection}{norm}{sampling}-lr{self.lr:g}-mu{self.mean_recurrence}-s{self.seed}"

    def model_config(self, lab: LabConfig) -> ParcaeConfig:
        return lab.base_model().replace(**{name: getattr(self, name) for name in _GRID_FIELDS}, name=self.name)

    def train_config(self, lab: LabConfig, data_dir: Path) -> TrainConfig:
        return TrainConfig(
            data=str(data_dir), seq_len=lab.seq_len, batch_size=lab.batch_size, steps=lab.steps,
            optimizer="adamw", lr=self.lr, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
            schedule="constant", warmup=lab.warmup_steps / lab.steps, cooldown=0.0, grad_clip=1.0,
            seed=self.seed, device=lab.device, log_every=lab.log_every, eval_every=lab.steps,
            eval_batches=lab.eval_batches, checkpoint_every=lab.steps, keep_checkpoints=1,
        )  # fmt: skip


def plan_runs(lab: LabConfig) -> list[RunSpec]:
    """The grid, then the ablations at `ablation_lr` (a run shared with the grid is trained once)."""

    def norm_for(injection: str) -> bool:
        return paper_prelude_norm(injection) if lab.prelude_norm == "paper" else lab.prelude_norm == "on"

    runs: dict[str, RunSpec] = {}

    def add(spec: RunSpec) -> None:
        if spec.name in runs:
            old = runs[spec.name]
            groups = tuple(dict.fromkeys(old.groups + spec.groups))
            spec = dataclasses.replace(old, depth_curve=old.depth_curve or spec.depth_curve, groups=groups)
        runs[spec.name] = spec

    for mean in lab.mean_recurrences:
        for injection in lab.injections:
            for lr in lab.lrs:
                for seed in range(lab.seeds):
                    add(RunSpec(injection, lr, mean, seed, norm_for(injection)))
    mean = lab.mean_recurrences[0]
    for seed in range(lab.seeds):
        base = RunSpec("diagonal", lab.ablation_lr, mean, seed, norm_for("diagonal"))
        variants = {
            "depth-sampling": dataclasses.replace(base, depth_sampling="per-batch"),
            "prelude-norm": dataclasses.replace(base, prelude_norm=not base.prelude_norm),
            "zoh": dataclasses.replace(base, injection="diagonal-zoh"),
        }
        for ablation in lab.ablations:
            for spec in (base, variants[ablation]):
                add(dataclasses.replace(spec, depth_curve=True, groups=(f"ablation:{ablation}",)))
    return list(runs.values())


def run_lab(lab: LabConfig, out: str | Path, *, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train (or reuse) every planned run, then write results.json, report.md and the plots; returns the results."""
    out = Path(out)
    _claim_lab_dir(out, lab)
    data_dir = prepare_once(lab.data, out / "data", "byte", echo, "the whole lab", val_fraction=0.02, overwrite=True)
    specs = plan_runs(lab)
    echo(f"stability lab: {len(specs)} runs × {lab.steps} steps = {len(specs) * lab.steps:,} steps → {out}")
    results, started = [], time.perf_counter()
    for index, spec in enumerate(specs, start=1):
        run_dir = out / "runs" / spec.name
        result_path = run_dir / RESULT_FILE
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            echo(f"[{index}/{len(specs)}] {spec.name}: done earlier ({result['verdict']})")
        else:
            if run_dir.exists():  # an interrupted run of this lab: train it again from scratch
                echo(f"[{index}/{len(specs)}] {spec.name}: incomplete, retraining")
                shutil.rmtree(run_dir)
            result = _train_one(spec, lab, data_dir, run_dir, echo)
            result_path.write_text(json.dumps(result, indent=2) + "\n")
            elapsed = time.perf_counter() - started
            echo(
                f"[{index}/{len(specs)}] {spec.name}: {result['verdict']} — val@{spec.mean_recurrence} "
                f"{fmt(result['val_loss'])}, max‖h‖ {fmt(result['max_state_norm'], '.3g')}, "
                f"ρ(J) {fmt(result['final_rho_J'])} ({result['seconds']:.0f} s; lab {elapsed / 60:.1f} min)"
            )
        results.append(result)
    (out / "results.json").write_text(json.dumps({"lab": lab.to_dict(), "runs": results}, indent=2) + "\n")
    echo(write_report(results, lab.describe(), out))
    return results


def _claim_lab_dir(out: Path, lab: LabConfig) -> None:
    """A new directory, or one holding this very lab (continued); never someone else's files."""
    manifest = out / LAB_FILE
    if manifest.is_file():
        stored, wanted = json.loads(manifest.read_text()), lab.to_dict()
        if stored != wanted:
            keys = [key for key in sorted(set(stored) | set(wanted)) if stored.get(key) != wanted.get(key)]
            changed = ", ".join(f"{key} {stored.get(key)!r} → {wanted.get(key)!r}" for key in keys)
            raise ValueError(f"{out} holds a stability lab with other settings ({changed}); choose another --out.")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a stability lab directory; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(lab.to_dict(), indent=2) + "\n")


def _train_one(spec: RunSpec, lab: LabConfig, data_dir: Path, run_dir: Path, echo: Callable[[str], None]) -> dict:
    model_cfg = spec.model_config(lab)
    jacobians: list[dict[str, Any]] = []
    trainer: Trainer | None = None

    def probe(model: Parcae, step: int) -> None:
        if trainer is None or not trainer.val_batches:
            return
        ids = trainer.val_batches[0][0][: lab.jacobian_sequences].to(trainer.device)
        try:
            spectrum = jacobian_spectrum(model, ids, steps=lab.jacobian_steps, restarts=1, seed=spec.seed)
            jacobians.append({"step": step, **spectrum.summary()})
        except ValueError as err:  # a non-finite state: the Jacobian is undefined there
            jacobians.append({"step": step, "error": str(err)})

    def on_backward(step: int, model: Parcae) -> None:
        # Called before the update of step+1, i.e. with the weights after `step` updates.
        if lab.jacobian_every and step > 0 and step % lab.jacobian_every == 0:
            probe(model, step)

    started = time.perf_counter()
    options = {"progress_bar": False, "echo": lambda line: echo(f"  {spec.name}: {line}"), "on_backward": on_backward}
    trainer = Trainer(model_cfg, spec.train_config(lab, data_dir), run_dir, **options)
    error = None
    try:
        summary = trainer.train()
    except TrainingError as err:  # a diverged run is a result, not a failure of the lab
        error = str(err)
        trainer.metrics_file.close()
    else:
        if summary["interrupted"]:  # Ctrl-C / SIGTERM: stop the lab; this run is retrained on the next call
            echo(f"interrupted during {spec.name}; rerun the same command to continue (finished runs are kept).")
            raise KeyboardInterrupt
    steps_done = trainer.progress.step
    probe(trainer.model, steps_done)
    depth_curve = None
    if spec.depth_curve and trainer.val_batches:
        depths = list(range(1, 2 * spec.mean_recurrence + 1))
        results = loss_by_depth(trainer.model, trainer.val_batches, depths, state_seed=spec.seed)
        depth_curve = {str(r.depth): r.loss for r in results}
    curves = RunCurves.read(run_dir)
    verdict = classify(
        curves, warmup_steps=lab.warmup_steps, d_state=model_cfg.d_state, mean_recurrence=spec.mean_recurrence,
        thresholds=lab.thresholds, stopped=error is not None,
    )  # fmt: skip
    return {
        **dataclasses.asdict(spec),
        "name": spec.name,
        "run_dir": str(run_dir),
        "verdict": verdict.describe(),
        "diverged": verdict.diverged,
        "reasons": list(verdict.reasons),
        "error": error,
        "steps_done": steps_done,
        "seconds": round(time.perf_counter() - started, 1),
        **curves.summary(spec.mean_recurrence),
        "final_rho_J": jacobians[-1].get("rho_J") if jacobians else None,
        "jacobian": jacobians,
        "depth_curve": depth_curve,
        "curves": {"step": curves.steps, "loss": curves.loss, "rho_A": curves.rho_A, "state_norm": curves.state_norm},
    }
