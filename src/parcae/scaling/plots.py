"""PNG plots of the scaling fits (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .laws import TESTTIME_FORMS


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_isoflop(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """isoFLOP parabolas with their minima, and μ*(C), D*(C) with the fitted power laws."""
    plt = _pyplot()
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(report["budgets"])))
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    for entry, color in zip(report["budgets"], colors, strict=True):
        mu, loss = np.array(entry["mean_recurrence"]), np.array(entry["val_loss"])
        grid = np.linspace(np.log(mu.min()) - 0.2, np.log(mu.max()) + 0.2, 200)
        ax.scatter(mu, loss, color=color, zorder=3)
        label = f"C = {entry['budget_flops']:.3g}"
        ax.plot(np.exp(grid), np.polyval(entry["parabola_ln_mu"], grid), color=color, label=label)
        if entry["mu_opt"] is not None:
            optimum = [entry["mu_opt"]], [entry["loss_opt"]]
            ax.scatter(*optimum, marker="*", s=160, color=color, edgecolor="black", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("mean recurrence μ_rec")
    ax.set_ylabel("validation loss at T = μ_rec")
    ax.set_title("isoFLOP profiles (★ = parabola minimum)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    paths = [_save(fig, out_dir / "isoflop_parabolas.png")]

    valid = [e for e in report["budgets"] if e["mu_opt"] is not None]
    budgets = np.array([e["budget_flops"] for e in valid])
    grid = np.geomspace(budgets.min() / 1.5, budgets.max() * 1.5, 100)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, key, law_key, label in (
        (axes[0], "mu_opt", "mu_law", "μ*"),
        (axes[1], "tokens_opt", "tokens_law", "D* (tokens)"),
    ):
        law = report[law_key]
        ax.scatter(budgets, [e[key] for e in valid], zorder=3)
        fitted = law["prefactor"] * grid ** law["exponent"]
        ax.plot(grid, fitted, color="C1", label=f"{label} ∝ C^{law['exponent']:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3, which="both")
    paths.append(_save(fig, out_dir / "isoflop_power_laws.png"))
    return paths


def plot_predicted_vs_observed(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Predicted against observed loss for the params / unified laws (held-out points in a second colour)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    observed, predicted = np.array(report["observed"]), np.array(report["predicted"])
    ax.scatter(observed, predicted, s=14, label=f"fitted ({len(observed)})")
    everything = [observed, predicted]
    if "holdout" in report:
        held_obs, held_pred = np.array(report["holdout"]["observed"]), np.array(report["holdout"]["predicted"])
        ax.scatter(held_obs, held_pred, s=18, marker="s", color="C3", label=f"held out ({len(held_obs)})")
        everything += [held_obs, held_pred]
    low, high = min(a.min() for a in everything), max(a.max() for a in everything)
    ax.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("observed validation loss")
    ax.set_ylabel("predicted")
    ax.set_title(f"{report['kind']} law: predicted vs observed")
    ax.legend()
    ax.grid(alpha=0.3)
    return [_save(fig, out_dir / f"{report['kind']}_predicted_vs_observed.png")]


def plot_testtime(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Loss against test-time depth per run, with the fitted L∞ + Z·e^{−zT}; one panel per budget."""
    plt = _pyplot()
    exponential = TESTTIME_FORMS[0]
    budgets = sorted({r["budget_flops"] for r in report["runs"]})
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 4), dpi=120, squeeze=False)
    means = sorted({r["mean_recurrence"] for r in report["runs"]})
    colors = dict(zip(means, plt.cm.plasma(np.linspace(0, 0.85, len(means))), strict=True))
    for ax, budget in zip(axes[0], budgets, strict=True):
        for run in (r for r in report["runs"] if r["budget_flops"] == budget):
            color = colors[run["mean_recurrence"]]
            depths = np.array(run["eval_depth"])
            ax.scatter(depths, run["val_loss"], color=color, s=12, zorder=3)
            fit = run.get("in_distribution", {}).get(exponential.name, {})
            if "parameters" in fit:
                grid = np.linspace(depths.min(), depths.max(), 200)
                curve = exponential.function(grid, np.array(list(fit["parameters"].values())))
                ax.plot(grid, curve, color=color, label=f"μ_rec {run['mean_recurrence']:g}")
            ax.axvline(run["mean_recurrence"], color=color, linestyle=":", linewidth=0.8)
        ax.set_xlabel("test-time depth T")
        ax.set_ylabel("validation loss")
        ax.set_title(f"C = {budget:.3g}: L∞ + Z·e^(−zT)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return [_save(fig, out_dir / "testtime_curves.png")]


def plot_fit(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every plot of one fit report into `out_dir`; returns the paths written."""
    plot = {"isoflop": plot_isoflop, "testtime": plot_testtime}.get(report["kind"], plot_predicted_vs_observed)
    return plot(report, out_dir)
