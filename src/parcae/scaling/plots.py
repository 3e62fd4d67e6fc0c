"""PNG plots of the scaling fits (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..plotting import decorate, pyplot, save
from .laws import TESTTIME_FORMS

plt = pyplot()


def plot_isoflop(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """isoFLOP parabolas with their minima, and μ*(C), D*(C) with the fitted power laws."""
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(report["budgets"])))
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    for entry, color in zip(report["budgets"], colors, strict=True):
        mu, loss = np.array(entry["mean_recurrence"]), np.array(entry["val_loss"])
        grid = np.linspace(np.log(mu.min()) - 0.2, np.log(mu.max()) + 0.2, 200)
        ax.scatter(mu, loss, color=color, zorder=3)
        label = f"C = {entry['budget_flops']:.3g}"
        ax.plot(np.exp(grid), np.polyval(entry["parabola_ln_mu"], grid), color=color, label=label)
        if entry["mu_opt"] is not None:
            ax.scatter(entry["mu_opt"], entry["loss_opt"], marker="*", s=160, color=color, edgecolor="black", zorder=4)
    ax.set(xscale="log", xlabel="mean recurrence μ_rec", ylabel="validation loss at T = μ_rec")
    ax.set_title("isoFLOP profiles (★ = parabola minimum)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    paths = [save(fig, out_dir / "isoflop_parabolas.png")]
    valid = [e for e in report["budgets"] if e["mu_opt"] is not None]
    budgets = np.array([e["budget_flops"] for e in valid])
    grid = np.geomspace(budgets.min() / 1.5, budgets.max() * 1.5, 100)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    panels = (("mu_opt", "mu_law", "μ*"), ("tokens_opt", "tokens_law", "D* (tokens)"))
    for ax, (key, law_key, label) in zip(axes, panels, strict=True):
        law = report[law_key]
        ax.scatter(budgets, [e[key] for e in valid], zorder=3)
        fitted = law["prefactor"] * grid ** law["exponent"]
        ax.plot(grid, fitted, color="C1", label=f"{label} ∝ C^{law['exponent']:.3f}")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=label)
        ax.legend()
        ax.grid(alpha=0.3, which="both")
    paths.append(save(fig, out_dir / "isoflop_power_laws.png"))
    return paths


def plot_predicted_vs_observed(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Predicted against observed loss for the params / unified laws (held-out points in a second colour)."""
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
    decorate(ax, "observed validation loss", "predicted", f"{report['kind']} law: predicted vs observed", legend=0)
    return [save(fig, out_dir / f"{report['kind']}_predicted_vs_observed.png")]


def plot_testtime(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Loss against test-time depth per run, with the fitted L∞ + Z·e^{−zT}; one panel per budget."""
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
        decorate(ax, "test-time depth T", "validation loss", f"C = {budget:.3g}: L∞ + Z·e^(−zT)", legend=7)
    return [save(fig, out_dir / "testtime_curves.png")]


def plot_fit(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every plot of one fit report into `out_dir`; returns the paths written."""
    plot = {"isoflop": plot_isoflop, "testtime": plot_testtime}.get(report["kind"], plot_predicted_vs_observed)
    return plot(report, out_dir)
