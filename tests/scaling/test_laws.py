"""The four scaling-law fits: planted parameters are recovered from noisy synthetic CSVs; bad CSVs fail clearly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from parcae.cli import main
from parcae.scaling.laws import FitError, fit_isoflop, fit_params, fit_testtime, fit_unified, read_results
from parcae.scaling.sweep import RESULT_COLUMNS

PNG_MAGIC = b"\x89PNG"


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] = RESULT_COLUMNS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def row(run: str, params: float, budget: float, mean: int, tokens: float, depth: int, loss: float) -> dict:
    return {"run": run, "params": params, "budget_flops": budget, "mean_recurrence": mean,
            "backprop_depth": (mean + 1) // 2, "tokens": tokens, "eval_depth": depth, "val_loss": loss}  # fmt: skip


# ---------------------------------------------------------------------- synthetic sweeps
GAMMA_MU, MU_AT_1E12 = 0.4, 2.5
BUDGETS = (1e12, 2e12, 4e12, 8e12, 16e12)
RECURRENCES = (1, 2, 4, 6, 8, 10, 12)
FLOPS_PER_ITERATION = 1e5  # FLOPs per token ∝ μ_rec here, so D* = C / (f·μ*) ∝ C^(1 − γμ)


def isoflop_rows(noise: float = 2e-4, budgets=BUDGETS, recurrences=RECURRENCES, curvature: float = 0.05) -> list:
    rng = np.random.default_rng(0)
    rows = []
    for budget in budgets:
        mu_opt = MU_AT_1E12 * (budget / 1e12) ** GAMMA_MU
        floor = 3.0 - 0.1 * np.log10(budget / 1e12)
        for mean in recurrences:
            loss = floor + curvature * (np.log(mean) - np.log(mu_opt)) ** 2 + rng.normal(0, noise)
            tokens = budget / (FLOPS_PER_ITERATION * mean)
            rows.append(row(f"C{budget:g}-mu{mean}", 1e5 * mean, budget, mean, tokens, mean, loss))
    return rows


TRAINING_LAW = {"E": 1.8, "A": 400.0, "a": 0.5, "B": 2000.0, "b": 0.4}


def training_law_rows(ns, ds, noise: float, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    p = TRAINING_LAW
    rows = []
    for n in ns:
        for d in ds:
            loss = (p["E"] + p["A"] * n ** -p["a"] + p["B"] * d ** -p["b"]) * np.exp(rng.normal(0, noise))
            rows.append(row(f"N{n:.3g}-D{d:.3g}", n, 1e15, 4, d, 4, loss))
    return rows


def curve_rows(noise: float = 3e-4) -> tuple[list, dict[str, float]]:
    rng = np.random.default_rng(2)
    rows, planted = [], {}
    for mean in (2, 4, 8):
        name, rate = f"mu{mean}", 0.8 / mean
        planted[name] = rate
        for depth in range(1, 25):
            loss = (2.0 + 1.5 * np.exp(-rate * depth)) * np.exp(rng.normal(0, noise))
            rows.append(row(name, 1e6, 1e15, mean, 1e8, depth, loss))
    return rows, planted


UNIFIED_LAW = {"E": 1.8, "X": 400.0, "x": 0.5, "Y": 2000.0, "y": 0.4, "Z": 0.8, "z": 2.0}


def unified_rows(noise: float = 5e-4) -> list:
    rng = np.random.default_rng(3)
    p = UNIFIED_LAW
    rows = []
    for n in np.geomspace(1e5, 1e7, 3):
        for d in np.geomspace(1e6, 1e9, 3):
            for mean in (2, 4, 8):
                for depth in (1, 2, 4, 8, 12, 16):
                    floor = p["E"] + p["X"] * n ** -p["x"] + p["Y"] * d ** -p["y"]
                    loss = (floor + p["Z"] * np.exp(-p["z"] * depth / mean)) * np.exp(rng.normal(0, noise))
                    rows.append(row(f"N{n:.3g}-D{d:.3g}-mu{mean}", n, 1e15, mean, d, depth, loss))
    return rows


# ---------------------------------------------------------------------- recovery
def test_isoflop_recovers_the_planted_power_laws(tmp_path: Path) -> None:
    results = read_results(write_csv(tmp_path / "r.csv", isoflop_rows()))
    report = fit_isoflop(results, bootstrap=200, seed=0)
    assert report["mu_law"]["exponent"] == pytest.approx(GAMMA_MU, abs=0.02)
    assert report["tokens_law"]["exponent"] == pytest.approx(1 - GAMMA_MU, abs=0.02)
    assert report["mu_law"]["prefactor"] * 1e12**GAMMA_MU == pytest.approx(MU_AT_1E12, rel=0.1)
    low, high = report["mu_law"]["exponent_ci95"]
    assert low < report["mu_law"]["exponent"] < high
    assert all(b["status"] == "ok" and b["in_sampled_range"] for b in report["budgets"])


def test_params_fit_recovers_the_planted_law_and_scores_a_holdout(tmp_path: Path) -> None:
    fit_rows = training_law_rows(np.geomspace(1e5, 1e7, 6), np.geomspace(1e6, 1e9, 6), noise=1e-3)
    held_rows = training_law_rows([3e5, 3e6], [3e7, 3e8], noise=0.0)
    results = read_results(write_csv(tmp_path / "fit.csv", fit_rows))
    holdout = read_results(write_csv(tmp_path / "held.csv", held_rows))
    report = fit_params(results, holdout=holdout, restarts=4, bootstrap=0, seed=0)
    p = report["parameters"]
    assert p["a"] == pytest.approx(TRAINING_LAW["a"], abs=0.02)
    assert p["b"] == pytest.approx(TRAINING_LAW["b"], abs=0.02)
    assert p["E"] == pytest.approx(TRAINING_LAW["E"], rel=0.02)
    assert report["holdout"]["mape_percent"] < 0.5
    assert report["huber_mean"] < 1e-6


def test_testtime_recovers_z_and_ranks_the_exponential_first(tmp_path: Path) -> None:
    rows, planted = curve_rows()
    report = fit_testtime(read_results(write_csv(tmp_path / "r.csv", rows)))
    for run in report["runs"]:
        fitted = run["in_distribution"]["exponential"]["parameters"]
        assert fitted["z"] == pytest.approx(planted[run["run"]], rel=0.05)
    assert report["ranking"]["in_distribution"][0] == "exponential"
    assert report["ranking"]["extrapolation"][0] == "exponential"
    by_form = {r["form"]: r for r in report["table"]}
    # μ_rec 2 leaves only T ∈ {1, 2} to fit when extrapolating: too few for three parameters, so it is skipped.
    assert by_form["exponential"]["in_distribution_runs"] == 3
    assert by_form["exponential"]["extrapolation_runs"] == 2


def test_unified_fit_recovers_the_planted_law(tmp_path: Path) -> None:
    results = read_results(write_csv(tmp_path / "r.csv", unified_rows()))
    report = fit_unified(results, restarts=3, bootstrap=0, seed=0)
    p = report["parameters"]
    assert p["x"] == pytest.approx(UNIFIED_LAW["x"], abs=0.02)
    assert p["y"] == pytest.approx(UNIFIED_LAW["y"], abs=0.02)
    assert p["z"] == pytest.approx(UNIFIED_LAW["z"], rel=0.05)
    assert report["mape_percent"] < 0.2


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rows: [{k: v for k, v in r.items() if k != "tokens"} for r in rows], "lacks column(s) tokens"),
        (lambda rows: [{**r, "val_loss": "nan"} if i == 3 else r for i, r in enumerate(rows)], "val_loss is nan"),
        (lambda rows: [{**r, "params": "lots"} if i == 0 else r for i, r in enumerate(rows)], "params is not a number"),
        (lambda rows: [*rows, rows[0]], "a second row for run"),
        (lambda rows: [], "no data rows"),
    ],
)
def test_malformed_csv_is_one_clear_error(tmp_path: Path, mutate, message: str) -> None:
    rows = mutate(isoflop_rows())
    columns = tuple(rows[0]) if rows else RESULT_COLUMNS
    path = write_csv(tmp_path / "bad.csv", rows, columns)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_results(path)


def test_isoflop_refuses_a_budget_with_two_points(tmp_path: Path) -> None:
    rows = [r for r in isoflop_rows() if not (r["budget_flops"] == 4e12 and r["mean_recurrence"] > 2)]
    with pytest.raises(FitError, match=r"budget 4e\+12 has 2 point\(s\) \(μ_rec 1, 2\); a parabola needs at least 3"):
        fit_isoflop(read_results(write_csv(tmp_path / "r.csv", rows)))


def test_isoflop_without_minima_says_so(tmp_path: Path) -> None:
    rows = isoflop_rows(noise=0.0, curvature=-0.05)  # every profile opens downward: no minimum anywhere
    with pytest.raises(FitError, match="only 0 of 5 budgets have a parabola with a minimum"):
        fit_isoflop(read_results(write_csv(tmp_path / "r.csv", rows)))


def test_too_few_points_for_the_laws(tmp_path: Path) -> None:
    results = read_results(write_csv(tmp_path / "r.csv", training_law_rows([1e5, 1e6], [1e6, 1e7], noise=0.0)))
    with pytest.raises(FitError, match=r"5 parameters but .* only 4 points"):
        fit_params(results, restarts=2)
    short = [r for r in curve_rows()[0] if r["eval_depth"] <= 2]
    with pytest.raises(FitError, match="test-time fit needs"):
        fit_testtime(read_results(write_csv(tmp_path / "t.csv", short)))


# ---------------------------------------------------------------------- the command line
def test_fit_cli_round_trip_writes_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    iso = write_csv(tmp_path / "iso.csv", isoflop_rows())
    assert main(["fit", "isoflop", str(iso), "--out", str(tmp_path / "iso"), "--bootstrap", "50"]) == 0
    report = json.loads((tmp_path / "iso" / "fit.json").read_text())
    assert report["kind"] == "isoflop" and report["mu_law"]["exponent"] == pytest.approx(GAMMA_MU, abs=0.02)
    assert "μ* =" in capsys.readouterr().out
    for name in ("isoflop_parabolas.png", "isoflop_power_laws.png"):
        assert (tmp_path / "iso" / name).read_bytes()[:4] == PNG_MAGIC

    # Never overwritten silently.
    assert main(["fit", "isoflop", str(iso), "--out", str(tmp_path / "iso")]) == 2
    assert "already exists" in capsys.readouterr().err

    rows, _ = curve_rows()
    tt = write_csv(tmp_path / "tt.csv", rows)
    assert main(["fit", "testtime", str(tt), "--out", str(tmp_path / "tt")]) == 0
    assert (tmp_path / "tt" / "testtime_curves.png").read_bytes()[:4] == PNG_MAGIC
    assert "ranking (extrapolation): exponential" in capsys.readouterr().out
    assert main(["fit", "testtime", str(tt), "--holdout", str(tt), "--out", str(tmp_path / "x")]) == 2
    assert "--holdout applies to the params and unified fits" in capsys.readouterr().err

    fit_rows = training_law_rows(np.geomspace(1e5, 1e7, 4), np.geomspace(1e6, 1e9, 4), noise=1e-3)
    params_csv = write_csv(tmp_path / "p.csv", fit_rows)
    held = write_csv(tmp_path / "h.csv", training_law_rows([3e5], [3e7, 3e8], noise=0.0))
    argv = ["fit", "params", str(params_csv), "--holdout", str(held), "--out", str(tmp_path / "p"),
            "--restarts", "4", "--bootstrap", "10"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "p" / "fit.json").read_text())
    assert set(report["parameters"]) == {"E", "A", "a", "B", "b"} and report["holdout"]["points"] == 2
    assert set(report["uncertainty"]) == {"E", "A", "a", "B", "b"}
    assert (tmp_path / "p" / "params_predicted_vs_observed.png").read_bytes()[:4] == PNG_MAGIC

    assert main(["fit", "unified", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "u")]) == 2
    assert "not found" in capsys.readouterr().err
