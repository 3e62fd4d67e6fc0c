"""The stability lab's results: a run's logged curves, the divergence rule (`classify`, README § Stability lab,
"Verdict"), the report's tables and plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..plotting import decorate, pyplot, save
from ..train.trainer import METRICS_FILE


@dataclass(frozen=True)
class Thresholds:
    # ‖h_T‖ / √d_state during training; at 2⁸ an O(1) update of the core falls below bfloat16's resolution
    max_state_rms: float = 256.0
    state_growth: float = 2.5  # ‖h_{2μ}‖ / ‖h_μ‖ at the final validation; h_T ≈ h₀ + T·e gives at most 2×


def paper_prelude_norm(injection: str) -> bool:
    """The paper's pairing: Parcae (diagonal injections) normalises e; the RDM baselines do not."""
    return injection.startswith("diagonal")


def norm_suffix(injection: str, prelude_norm: bool, on: str, off: str) -> str:
    """A label suffix only when the prelude norm departs from the paper's pairing."""
    return "" if prelude_norm == paper_prelude_norm(injection) else on if prelude_norm else off


@dataclass
class RunCurves:
    """What a run's metrics.jsonl says, as plain lists (one entry per logged training step)."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    rho_A: list[float] = field(default_factory=list)
    state_norm: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    validations: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, run_dir: Path) -> RunCurves:
        curves = cls()
        path = run_dir / METRICS_FILE
        for line in path.read_text().splitlines() if path.is_file() else []:
            entry = json.loads(line) if line.strip() else {}
            event = entry.get("event")
            if event == "skip":
                curves.skipped_steps.append(int(entry["step"]))
            elif event == "val":
                curves.validations.append(entry)
            elif event is None and "loss" in entry:
                curves.steps.append(int(entry["step"]))
                curves.loss.append(number(entry["loss"]))
                curves.rho_A.append(number(entry.get("rho_A")))
                curves.state_norm.append(number(entry.get("state_norm")))
        return curves

    @property
    def final_validation(self) -> dict[str, Any]:
        return self.validations[-1] if self.validations else {}

    def final_state_norms(self) -> dict[int, float]:
        """‖h_T‖ per evaluated depth T at the final validation (empty without one)."""
        final = self.final_validation
        return {int(k): number(v) for k, v in (final.get("state_norm") or {}).items()}

    def state_norms_seen(self, mean_recurrence: int) -> list[float]:
        """Every logged training ‖h_T‖ and the final validation's ‖h_μ‖ (the trained model at its own depth)."""
        final = self.final_state_norms()
        return self.state_norm + ([final[mean_recurrence]] if mean_recurrence in final else [])

    def summary(self, mean_recurrence: int) -> dict[str, Any]:
        """A run's headline numbers: its losses, the final validation, the largest ‖h_T‖ and ρ(Ā)."""
        final = self.final_validation
        val_losses = {int(k): number(v) for k, v in final.get("val_loss", {}).items()}
        return {
            "initial_loss": self.loss[0] if self.loss else None,
            "final_loss": tail_mean(self.loss),
            "val_loss": val_losses.get(mean_recurrence),
            "val_loss_by_depth": {str(k): v for k, v in sorted(val_losses.items())},
            "final_state_norm_by_depth": final.get("state_norm"),
            "max_state_norm": finite_max(self.state_norms_seen(mean_recurrence)),
            "max_rho_A": finite_max(self.rho_A),
            "final_rho_A": self.rho_A[-1] if self.rho_A else None,
        }


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


# ---------------------------------------------------------------------- the report
def write_report(results: Sequence[dict[str, Any]], settings: str, out: Path) -> str:
    """OUT/report.md (returned) and the plots; `settings`: the sentence that describes the lab's recipe."""
    sections = [format_matrix(results), format_jacobian_table(results), format_ablation_table(results)]
    report = "\n\n".join(["# Stability lab", settings, *filter(None, sections)]) + "\n"
    (out / "report.md").write_text(report)
    write_plots(results, out)
    return report


def _column(result: dict[str, Any]) -> tuple[str, bool, int]:
    """The grid column (and plot panel) of a run: injection, prelude norm, μ_rec."""
    return result["injection"], result["prelude_norm"], result["mean_recurrence"]


def _column_label(column: tuple[str, bool, int], sep: str) -> str:
    injection, prelude_norm, mean = column
    return f"{injection}{norm_suffix(injection, prelude_norm, ' +pn', ' −pn')}{sep}{mean}"


def format_matrix(results: Sequence[dict[str, Any]]) -> str:
    """Rows: LR; columns: injection (× μ_rec); cells: verdicts per seed, mean val@μ, max ‖h‖, max ρ(Ā), ρ(J)."""
    grid = [r for r in results if "grid" in r["groups"]]
    columns = list(dict.fromkeys(_column(r) for r in grid))
    header = ["LR"] + [_column_label(column, " μ") for column in columns]
    lines = [
        "## Stability matrix — verdict per seed; val@μ, max ‖h_T‖, max ρ(Ā), final ρ(J)",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for lr in sorted({r["lr"] for r in grid}):
        cells = [f"{lr:g}"]
        for column in columns:
            runs = [r for r in grid if _column(r) == column and r["lr"] == lr]
            if not runs:
                cells.append("")
                continue
            verdicts = " ".join(r["verdict"] for r in sorted(runs, key=lambda r: r["seed"]))
            cells.append(
                f"{verdicts}: {fmt(mean(r['val_loss'] for r in runs))}, "
                f"{fmt(mean(r['max_state_norm'] for r in runs), '.3g')}, "
                f"{fmt(mean(r['max_rho_A'] for r in runs), '.2f')}, "
                f"{fmt(mean(r['final_rho_J'] for r in runs), '.2f')}"
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
        start = f"| {r['name']} | {r['verdict']} |"
        if "error" in j or not j:
            lines.append(f"{start} {fmt(r['final_rho_A'])} | {j.get('error', 'n/a')} | | | | | |")
            continue
        lines.append(
            f"{start} {fmt(j['rho_A'])} | {fmt(j['rho_J'])} | {fmt(j['rho_J_median'])} | "
            f"{fmt(j['block_norm_max'])} | {fmt(j.get('map_norm'))} | {fmt(j['state_norm'], '.3g')} | "
            f"{fmt(j['radius_residual_max'], '.1e')} |"
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
        losses = " | ".join(fmt(r["depth_curve"].get(str(d))) for d in depths)
        lines.append(f"| {r['name']} | {groups} | {r['verdict']} | {losses} |")
    return "\n".join(lines)


def write_plots(results: Sequence[dict[str, Any]], out: Path) -> None:
    """loss.png, rho_A.png, state_norm.png, jacobian.png (one panel per grid column) and ablation_depth.png."""
    plt = pyplot()
    grid = [r for r in results if "grid" in r["groups"]]
    panels = list(dict.fromkeys(_column(r) for r in grid))
    labels = {"loss": "training loss", "rho_A": "ρ(Ā)", "state_norm": "‖h_T‖ (training)"}
    for key, ylabel in {**labels, "jacobian": "ρ(J) at h_μ (solid), ρ(Ā) (dashed)"}.items():
        width = max(1, len(panels))
        fig, axes = plt.subplots(1, width, figsize=(4.5 * width, 3.6), dpi=110, squeeze=False, sharey=True)
        for ax, panel in zip(axes[0], panels, strict=False):
            for r in (r for r in grid if _column(r) == panel):
                label = f"lr {r['lr']:g} s{r['seed']}" + (" ✗" if r["diverged"] else "")
                if key == "jacobian":  # a few probes per run: markers, and ρ(Ā) at the same steps dashed
                    probes = [j for j in r["jacobian"] if "rho_J" in j]
                    steps = [j["step"] for j in probes]
                    line = ax.plot(steps, [j["rho_J"] for j in probes], marker="o", markersize=3, label=label)
                    color = line[0].get_color()
                    ax.plot(steps, [j["rho_A"] for j in probes], "--", marker="o", markersize=3, color=color)
                else:
                    ax.plot(r["curves"]["step"], r["curves"][key], marker=None, markersize=3, label=label)
            if key in ("rho_A", "jacobian"):
                ax.axhline(1.0, color="gray", linewidth=0.8)
            if key == "state_norm":
                ax.set_yscale("log")
            decorate(ax, "step", title=_column_label(panel, ", μ_rec "), legend=7)
        axes[0][0].set_ylabel(ylabel)
        save(fig, out / f"{key}.png")
    ablations = [r for r in results if r.get("depth_curve")]
    if ablations:
        fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
        for r in ablations:
            depths = sorted(int(d) for d in r["depth_curve"])
            ax.plot(depths, [r["depth_curve"][str(d)] for d in depths], marker="o", markersize=3, label=r["name"])
        title = "ablations: loss vs test-time depth"
        decorate(ax, "test-time depth T", "validation loss (nats/token)", title, legend=7)
        save(fig, out / "ablation_depth.png")


# ---------------------------------------------------------------------- small helpers
def number(value: Any) -> float:
    """A logged number (the trainer writes non-finite floats as strings); missing → nan."""
    return float("nan") if value is None else float(value)


def finite_max(values: Sequence[float]) -> float | None:
    if any(math.isinf(v) for v in values):
        return float("inf")
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else None


def tail_mean(values: Sequence[float], count: int = 5) -> float | None:
    tail = [v for v in values[-count:] if math.isfinite(v)]
    return sum(tail) / len(tail) if tail else None


def mean(values: Any) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "∞" if value > 0 else str(value)
    return format(value, spec)
