"""The stability lab: the paper's stability findings (its Tables 2, 4 and 8) in miniature, on any preset.

`run_lab` trains a grid — injection × learning rate × μ_rec × seed — with everything else equal, plus
ablations of the Parcae recipe at one learning rate (per-sequence vs per-batch depth sampling,
prelude norm on/off, Euler vs exact-ZOH B̄), then classifies every run and writes a report:
```
OUT/lab.json                 the lab's configuration (rerunning with the same OUT continues it)
OUT/data/                    the corpus, tokenized once and shared by every run
OUT/runs/NAME/               one training run each (metrics.jsonl, final checkpoint, lab_result.json)
OUT/results.json             every run's verdict, curves summary, Jacobian log and depth curve
OUT/report.md                stability matrix, Jacobian-vs-ρ(Ā) table, ablation table
OUT/loss.png, rho_A.png, state_norm.png, jacobian.png, ablation_depth.png
```

Recipe (that of small reference runs of the official code, so that results are comparable with them; the
runs and their findings are summarised in docs/official-format.md):
AdamW for every parameter (β 0.9/0.95, ε 1e-10), no weight decay, linear warm-up over `warmup_steps`
then constant LR, gradient clipping 1.0, micro-batches of 16 × 128 tokens, per-sequence Poisson depths.
Runs train on `device`, "auto" by default as in `parcae train` (CUDA when available, with its bf16 autocast;
else the CPU in fp32); lab.json records the device it resolved to. Prelude norm follows the paper's pairing
by default (`prelude_norm="paper"`): on for the diagonal injections (Parcae), off for `add` and `linear`
(the RDM baselines, as the rdm-*-tiny presets).

Divergence rule (`classify`). A run is *diverged* when any of these holds, else *converged*:
- `nan`: a non-finite training loss or gradient (a skipped step, or the trainer's guard stopped the run);
- `loss`: after the warm-up, a logged training loss at or above the first step's loss (≈ ln V at init);
- `state-norm`: a logged training ‖h_T‖, or the final validation's ‖h_μ‖, exceeds `max_state_rms`·√d_state
  (the training log is sampled every `log_every` steps, the validation catches the end state). The default
  256 = 2⁸ is where an O(1) update from the core drops below bfloat16's resolution (8 significant bits),
  i.e. at the precision large runs train in, the loop could no longer move its own state;
- `state-growth`: at the final validation ‖h_{2μ}‖ > `state_growth`·‖h_μ‖ (default 2.5): doubling the
  depth grows the state faster than a marginally stable loop can (h_T ≈ h₀ + T·e, as the additive
  loop at init, gives at most 2×), i.e. exponentially — the loop itself is unstable (ρ(J) > 1 along
  the orbit). A bounded loop that settles has a ratio near 1.
The last two are the paper's mechanism (instability = exploding ‖h_T‖, Fig. 2); in the official code's
reference runs an additive RDM kept a good loss while its state norm exploded, so a rule on the loss alone
would call it converged.

Jacobian. At every `jacobian_every` steps (and for the final model) the lab evaluates
`parcae.eval.stability.jacobian_spectrum` at h_μ on the first validation sequences and logs ρ(J) (max over
tokens, = the full loop map's spectral radius), its median over tokens, ‖J_ii‖, ‖J‖ and ρ(Ā).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.shards import is_prepared, prepare
from ..data.tokenizer import get_tokenizer
from ..device import resolve_device
from ..eval.loss import loss_by_depth
from ..eval.stability import jacobian_spectrum
from ..model.config import INJECTIONS, ParcaeConfig, get_preset
from ..model.parcae import Parcae
from ..train.config import TrainConfig
from ..train.trainer import METRICS_FILE, Trainer, TrainingError

ABLATIONS = ("depth-sampling", "prelude-norm", "zoh")
PRELUDE_NORM_CHOICES = ("paper", "on", "off")
LAB_FILE = "lab.json"
RESULT_FILE = "lab_result.json"
# Model fields the lab sets per run; `model_overrides` may not touch them.
_GRID_FIELDS = ("injection", "prelude_norm", "mean_recurrence", "depth_sampling")


@dataclass(frozen=True)
class Thresholds:
    """Divergence thresholds (see the module docstring)."""

    max_state_rms: float = 256.0  # ‖h_T‖ / √d_state during training
    state_growth: float = 2.5  # ‖h_{2μ}‖ / ‖h_μ‖ at the final validation


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
        object.__setattr__(self, "injections", tuple(self.injections))
        object.__setattr__(self, "lrs", tuple(float(lr) for lr in self.lrs))
        object.__setattr__(self, "recurrences", tuple(int(r) for r in self.recurrences))
        object.__setattr__(self, "ablations", tuple(self.ablations))
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
        for name in ("seeds", "steps", "batch_size", "seq_len", "eval_batches", "log_every", "jacobian_sequences",
                     "jacobian_steps"):  # fmt: skip
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


# Quick mode: two learning rates either side of where the concat RDM diverged in the official code's reference
# runs (fine at 1e-2, diverged at 3e-2), short runs, no ablations, the Jacobian on the final models only
# (≈ 6–8 min on 2 cores for parcae-tiny).
QUICK = {"lrs": (3e-3, 3e-2), "steps": 60, "warmup_steps": 10, "ablations": (), "jacobian_every": 0}


# ---------------------------------------------------------------------- the plan
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
        norm = _norm_suffix(self.injection, self.prelude_norm, "+pn", "-pn")
        sampling = "" if self.depth_sampling == "per-sequence" else "-" + self.depth_sampling
        return f"{self.injection}{norm}{sampling}-lr{self.lr:g}-mu{self.mean_recurrence}-s{self.seed}"

    def model_config(self, lab: LabConfig) -> ParcaeConfig:
        return lab.base_model().replace(
            injection=self.injection, prelude_norm=self.prelude_norm, mean_recurrence=self.mean_recurrence,
            depth_sampling=self.depth_sampling, name=self.name,
        )  # fmt: skip

    def train_config(self, lab: LabConfig, data_dir: Path) -> TrainConfig:
        return TrainConfig(
            data=str(data_dir), seq_len=lab.seq_len, batch_size=lab.batch_size, steps=lab.steps,
            optimizer="adamw", lr=self.lr, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
            schedule="constant", warmup=lab.warmup_steps / lab.steps, cooldown=0.0, grad_clip=1.0,
            seed=self.seed, device=lab.device, log_every=lab.log_every, eval_every=lab.steps,
            eval_batches=lab.eval_batches, checkpoint_every=lab.steps, keep_checkpoints=1,
        )  # fmt: skip


def paper_prelude_norm(injection: str) -> bool:
    """The paper's pairing: Parcae (diagonal injections) normalises e; the RDM baselines do not."""
    return injection.startswith("diagonal")


def _norm_suffix(injection: str, prelude_norm: bool, on: str, off: str) -> str:
    """A label suffix only when the prelude norm departs from the paper's pairing."""
    if prelude_norm == paper_prelude_norm(injection):
        return ""
    return on if prelude_norm else off


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


# ---------------------------------------------------------------------- curves and the verdict
@dataclass
class RunCurves:
    """What a run's metrics.jsonl says, as plain lists (one entry per logged training step)."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    rho_A: list[float] = field(default_factory=list)
    state_norm: list[float] = field(default_factory=list)
    residual: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    validations: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, run_dir: Path) -> RunCurves:
        curves = cls()
        path = run_dir / METRICS_FILE
        if not path.is_file():
            return curves
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            event = entry.get("event")
            if event == "skip":
                curves.skipped_steps.append(int(entry["step"]))
            elif event == "val":
                curves.validations.append(entry)
            elif event is None and "loss" in entry:
                curves.steps.append(int(entry["step"]))
                curves.loss.append(_number(entry["loss"]))
                curves.grad_norm.append(_number(entry.get("grad_norm")))
                curves.rho_A.append(_number(entry.get("rho_A")))
                curves.state_norm.append(_number(entry.get("state_norm")))
                curves.residual.append(_number(entry.get("recurrent_residual")))
        return curves

    def final_validation(self) -> dict[str, Any] | None:
        return self.validations[-1] if self.validations else None

    def final_state_norms(self) -> dict[int, float]:
        """‖h_T‖ per evaluated depth T at the final validation (empty without one)."""
        final = self.final_validation() or {}
        return {int(k): _number(v) for k, v in (final.get("state_norm") or {}).items()}

    def state_norms_seen(self, mean_recurrence: int) -> list[float]:
        """Every logged training ‖h_T‖ and the final validation's ‖h_μ‖ (the trained model at its own depth)."""
        final = self.final_state_norms()
        return self.state_norm + ([final[mean_recurrence]] if mean_recurrence in final else [])


@dataclass(frozen=True)
class Verdict:
    diverged: bool
    reasons: tuple[str, ...]

    def describe(self) -> str:
        return f"✗ {'+'.join(self.reasons)}" if self.diverged else "✓"


def classify(
    curves: RunCurves,
    *,
    warmup_steps: int,
    d_state: int,
    mean_recurrence: int,
    thresholds: Thresholds,
    stopped: bool = False,
) -> Verdict:
    """Converged or diverged, by the rule in the module docstring; `stopped`: the trainer gave up."""
    reasons = []
    if stopped or curves.skipped_steps or any(not math.isfinite(x) for x in curves.loss):
        reasons.append("nan")
    if curves.loss:
        initial = curves.loss[0]
        if any(s > warmup_steps and x >= initial for s, x in zip(curves.steps, curves.loss, strict=True)):
            reasons.append("loss")
    limit = thresholds.max_state_rms * math.sqrt(d_state)
    if any(not x <= limit for x in curves.state_norms_seen(mean_recurrence)):  # non-finite counts as a blow-up
        reasons.append("state-norm")
    norms = curves.final_state_norms()
    at_mean, at_double = norms.get(mean_recurrence), norms.get(2 * mean_recurrence)
    if at_mean is not None and at_double is not None and not at_double <= thresholds.state_growth * at_mean:
        reasons.append("state-growth")
    return Verdict(diverged=bool(reasons), reasons=tuple(reasons))


# ---------------------------------------------------------------------- running
def run_lab(lab: LabConfig, out: str | Path, *, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train (or reuse) every planned run, then write results.json, report.md and the plots; returns the results."""
    out = Path(out)
    _claim_lab_dir(out, lab)
    data_dir = _prepare_data(lab, out, echo)
    specs = plan_runs(lab)
    total_steps = len(specs) * lab.steps
    echo(f"stability lab: {len(specs)} runs × {lab.steps} steps = {total_steps:,} steps → {out}")
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
                f"{_fmt(result['val_loss'])}, max‖h‖ {_fmt(result['max_state_norm'], '.3g')}, "
                f"ρ(J) {_fmt(result['final_rho_J'])} ({result['seconds']:.0f} s; lab {elapsed / 60:.1f} min)"
            )
        results.append(result)
    (out / "results.json").write_text(json.dumps({"lab": lab.to_dict(), "runs": results}, indent=2) + "\n")
    report = format_report(results, lab)
    (out / "report.md").write_text(report)
    write_plots(results, out)
    echo(report)
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


def _prepare_data(lab: LabConfig, out: Path, echo: Callable[[str], None]) -> Path:
    """Tokenize the corpus once for every run (a prepared directory is used as is)."""
    if is_prepared(lab.data):
        return Path(lab.data)
    data_dir = out / "data"
    if not is_prepared(data_dir):
        echo(f"tokenizing {lab.data} into {data_dir} (once for the whole lab) …")
        prepare(lab.data, get_tokenizer("byte"), data_dir, val_fraction=0.02, progress=False, overwrite=True)
    return data_dir


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
    trainer = Trainer(
        model_cfg, spec.train_config(lab, data_dir), run_dir, progress_bar=False,
        echo=lambda line: echo(f"  {spec.name}: {line}"), on_backward=on_backward,
    )  # fmt: skip
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
    final_val = curves.final_validation() or {}
    val_losses = {int(k): _number(v) for k, v in final_val.get("val_loss", {}).items()}
    final_jacobian = jacobians[-1] if jacobians else {}
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
        "initial_loss": curves.loss[0] if curves.loss else None,
        "final_loss": _tail_mean(curves.loss),
        "val_loss": val_losses.get(spec.mean_recurrence),
        "val_loss_by_depth": {str(k): v for k, v in sorted(val_losses.items())},
        "final_state_norm_by_depth": final_val.get("state_norm"),
        "max_state_norm": _finite_max(curves.state_norms_seen(spec.mean_recurrence)),
        "max_rho_A": _finite_max(curves.rho_A),
        "final_rho_A": curves.rho_A[-1] if curves.rho_A else None,
        "final_rho_J": final_jacobian.get("rho_J"),
        "jacobian": jacobians,
        "depth_curve": depth_curve,
        "curves": {"step": curves.steps, "loss": curves.loss, "rho_A": curves.rho_A, "state_norm": curves.state_norm},
    }


# ---------------------------------------------------------------------- the report
def format_report(results: Sequence[dict[str, Any]], lab: LabConfig) -> str:
    """Markdown: the stability matrix (Table-2 style), the Jacobian table and the ablation table."""
    sections = [
        "# Stability lab",
        f"preset {lab.preset}, data {lab.data}, {lab.steps} steps of {lab.batch_size}×{lab.seq_len} tokens, "
        f"AdamW (0.9, 0.95), no weight decay, {lab.warmup_steps}-step warm-up then constant LR, clip 1.0; "
        f"prelude norm: {lab.prelude_norm}; seeds {lab.seeds}. "
        f"Diverged (✗) = nan | loss ≥ initial after warm-up | ‖h_T‖ > {lab.thresholds.max_state_rms:g}·√d "
        f"(state-norm) | ‖h_2μ‖ > {lab.thresholds.state_growth:g}·‖h_μ‖ (state-growth).",
        format_matrix(results),
        format_jacobian_table(results),
    ]
    ablation = format_ablation_table(results)
    if ablation:
        sections.append(ablation)
    return "\n\n".join(sections) + "\n"


def format_matrix(results: Sequence[dict[str, Any]]) -> str:
    """Rows: LR; columns: injection (× μ_rec); cells: verdicts per seed, mean val@μ, max ‖h‖, max ρ(Ā), ρ(J)."""
    grid = [r for r in results if "grid" in r["groups"]]
    columns = list(dict.fromkeys((r["injection"], r["prelude_norm"], r["mean_recurrence"]) for r in grid))
    lrs = sorted({r["lr"] for r in grid})
    header = ["LR"] + [f"{inj}{_norm_suffix(inj, pn, ' +pn', ' −pn')} μ{mean}" for inj, pn, mean in columns]
    lines = [
        "## Stability matrix — verdict per seed; val@μ, max ‖h_T‖, max ρ(Ā), final ρ(J)",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for lr in lrs:
        cells = [f"{lr:g}"]
        for inj, pn, mean in columns:
            runs = [r for r in grid if (r["injection"], r["prelude_norm"], r["mean_recurrence"], r["lr"]) ==
                    (inj, pn, mean, lr)]  # fmt: skip
            if not runs:
                cells.append("")
                continue
            verdicts = " ".join(r["verdict"] for r in sorted(runs, key=lambda r: r["seed"]))
            cells.append(
                f"{verdicts}: {_fmt(_mean(r['val_loss'] for r in runs))}, "
                f"{_fmt(_mean(r['max_state_norm'] for r in runs), '.3g')}, "
                f"{_fmt(_mean(r['max_rho_A'] for r in runs), '.2f')}, "
                f"{_fmt(_mean(r['final_rho_J'] for r in runs), '.2f')}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_jacobian_table(results: Sequence[dict[str, Any]]) -> str:
    """The final model's Jacobian spectrum at h_μ next to ρ(Ā), one row per run."""
    lines = [
        "## Jacobian of the loop map at h_μ (final model) vs ρ(Ā)",
        "ρ(J) = max over tokens of ρ(J_ii) = the spectral radius of the whole map (block-triangular J); "
        "‖J_ii‖: per-token block norm; ‖J‖: whole-sequence map norm; res: largest relative Ritz residual.",
        "| run | verdict | ρ(Ā) | ρ(J) | median ρ(J_ii) | max ‖J_ii‖ | ‖J‖ | ‖h_μ‖ | res |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        j = r["jacobian"][-1] if r["jacobian"] else {}
        if "error" in j or not j:
            lines.append(f"| {r['name']} | {r['verdict']} | {_fmt(r['final_rho_A'])} | {j.get('error', 'n/a')} |"
                         " | | | | |")  # fmt: skip
            continue
        lines.append(
            f"| {r['name']} | {r['verdict']} | {_fmt(j['rho_A'])} | {_fmt(j['rho_J'])} | {_fmt(j['rho_J_median'])} | "
            f"{_fmt(j['block_norm_max'])} | {_fmt(j.get('map_norm'))} | {_fmt(j['state_norm'], '.3g')} | "
            f"{_fmt(j['radius_residual_max'], '.1e')} |"
        )
    return "\n".join(lines)


def format_ablation_table(results: Sequence[dict[str, Any]]) -> str:
    """Validation loss at every test-time depth for the ablation runs (as the paper's Tables 4 and 8)."""
    runs = [r for r in results if r.get("depth_curve")]
    if not runs:
        return ""
    depths = sorted({int(d) for r in runs for d in r["depth_curve"]})
    lines = [
        "## Ablations — validation loss at test-time depth T",
        "| run | ablation | verdict | " + " | ".join(f"T={d}" for d in depths) + " |",
        "|---|---|---|" + "---|" * len(depths),
    ]
    for r in runs:
        groups = ", ".join(g.split(":", 1)[1] for g in r["groups"] if g.startswith("ablation:"))
        losses = " | ".join(_fmt(r["depth_curve"].get(str(d))) for d in depths)
        lines.append(f"| {r['name']} | {groups} | {r['verdict']} | {losses} |")
    return "\n".join(lines)


def write_plots(results: Sequence[dict[str, Any]], out: Path) -> None:
    """loss.png, rho_A.png, state_norm.png, jacobian.png (one panel per grid column) and ablation_depth.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in results if "grid" in r["groups"]]
    panels = list(dict.fromkeys((r["injection"], r["prelude_norm"], r["mean_recurrence"]) for r in grid))
    series = {
        "loss": ("training loss", False, lambda r: (r["curves"]["step"], r["curves"]["loss"])),
        "rho_A": ("ρ(Ā)", False, lambda r: (r["curves"]["step"], r["curves"]["rho_A"])),
        "state_norm": ("‖h_T‖ (training)", True, lambda r: (r["curves"]["step"], r["curves"]["state_norm"])),
        "jacobian": ("ρ(J) at h_μ (solid), ρ(Ā) (dashed)", False,
                     lambda r: ([j["step"] for j in r["jacobian"] if "rho_J" in j],
                                [j["rho_J"] for j in r["jacobian"] if "rho_J" in j])),
    }  # fmt: skip
    for key, (label, log_scale, get) in series.items():
        fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.6), dpi=110,
                                 squeeze=False, sharey=True)  # fmt: skip
        for ax, (inj, pn, mean) in zip(axes[0], panels, strict=False):
            for r in (r for r in grid if (r["injection"], r["prelude_norm"], r["mean_recurrence"]) == (inj, pn, mean)):
                x, y = get(r)
                marker = "o" if key == "jacobian" else None  # only a few probes per run
                label = f"lr {r['lr']:g} s{r['seed']}" + (" ✗" if r["diverged"] else "")
                line = ax.plot(x, y, marker=marker, markersize=3, label=label)
                if key == "jacobian":
                    jac = [j for j in r["jacobian"] if "rho_J" in j]
                    ax.plot([j["step"] for j in jac], [j["rho_A"] for j in jac], "--", marker="o", markersize=3,
                            color=line[0].get_color())  # fmt: skip
            if key in ("rho_A", "jacobian"):
                ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_title(f"{inj}{_norm_suffix(inj, pn, ' +pn', ' −pn')}, μ_rec {mean}")
            ax.set_xlabel("step")
            if log_scale:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel(label)
        fig.tight_layout()
        fig.savefig(out / f"{key}.png")
        plt.close(fig)
    ablations = [r for r in results if r.get("depth_curve")]
    if ablations:
        fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
        for r in ablations:
            depths = sorted(int(d) for d in r["depth_curve"])
            ax.plot(depths, [r["depth_curve"][str(d)] for d in depths], marker="o", markersize=3, label=r["name"])
        ax.set_xlabel("test-time depth T")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("ablations: loss vs test-time depth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "ablation_depth.png")
        plt.close(fig)


# ---------------------------------------------------------------------- small helpers
def _number(value: Any) -> float:
    """A logged number (the trainer writes non-finite floats as strings); missing → nan."""
    if value is None:
        return float("nan")
    return float(value)


def _finite_max(values: Sequence[float]) -> float | None:
    if any(math.isinf(v) for v in values):
        return float("inf")
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else None


def _tail_mean(values: Sequence[float], count: int = 5) -> float | None:
    tail = [v for v in values[-count:] if math.isfinite(v)]
    return sum(tail) / len(tail) if tail else None


def _mean(values: Any) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return sum(values) / len(values)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "∞" if value > 0 else str(value)
    return format(value, spec)
