"""The paper's scaling-law fits (its §5; README § Scaling laws), each from a sweep's results CSV."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize

from .fitting import HUBER_DELTA, FitError, SumOfTerms, Term, ci95, huber, mape
from .sweep import RESULT_COLUMNS

_NUMERIC = RESULT_COLUMNS[1:]
Report = dict[str, Any]  # a fit's report, as written to fit.json


@dataclass(frozen=True)
class Results:
    """A results CSV as columns (numpy arrays); `run` holds the run names."""

    run: np.ndarray
    params: np.ndarray
    budget_flops: np.ndarray
    mean_recurrence: np.ndarray
    backprop_depth: np.ndarray
    tokens: np.ndarray
    eval_depth: np.ndarray
    val_loss: np.ndarray
    source: str = "results"

    def __len__(self) -> int:
        return len(self.run)

    def select(self, mask: np.ndarray) -> Results:
        return Results(**{name: getattr(self, name)[mask] for name in RESULT_COLUMNS}, source=self.source)

    def at_training_depth(self) -> Results:
        """Rows evaluated at T = μ_rec: the training law's loss."""
        rows = self.select(self.eval_depth == self.mean_recurrence)
        if not len(rows):
            raise FitError(f"{self.source} has no row with eval_depth == mean_recurrence (the training-depth loss).")
        return rows


def read_results(path: str | Path) -> Results:
    """Read and check a results CSV: every column present, numbers finite and positive, no duplicate rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results CSV {path} not found.")
    names: list[str] = []
    values: dict[str, list[float]] = {c: [] for c in _NUMERIC}
    seen: set[tuple[str, float]] = set()
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in RESULT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks column(s) {', '.join(missing)} (expected {','.join(RESULT_COLUMNS)}).")
        for line, row in enumerate(reader, start=2):
            for column in _NUMERIC:
                text = (row.get(column) or "").strip()
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError(f"{path} line {line}: {column} is not a number ({text!r}).") from None
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"{path} line {line}: {column} is {text} (every value must be finite and > 0).")
                values[column].append(value)
            key = (row["run"], values["eval_depth"][-1])
            if key in seen:
                raise ValueError(f"{path} line {line}: a second row for run {row['run']} at eval_depth {key[1]:g}.")
            seen.add(key)
            names.append(row["run"])
    if not names:
        raise ValueError(f"{path} has no data rows.")
    columns = {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}
    return Results(run=np.asarray(names, dtype=object), **columns, source=str(path))


def _parabola_minimum(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float | None]:
    coefficients = np.polyfit(x, y, 2)
    return coefficients, float(-coefficients[1] / (2 * coefficients[0])) if coefficients[0] > 0 else None


def _power_law(budgets: np.ndarray, values: np.ndarray) -> tuple[float, float, float | None]:
    """(prefactor, exponent, standard error of the exponent) of values = prefactor · budgets^exponent."""
    x, y = np.log(budgets), np.log(values)  # the callers give two or more distinct budgets
    slope, intercept = np.polyfit(x, y, 1)
    stderr = None
    if len(x) > 2:
        residual = y - (intercept + slope * x)
        stderr = float(math.sqrt(float(residual @ residual) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum())))
    return float(math.exp(intercept)), float(slope), stderr


def fit_isoflop(results: Results, *, bootstrap: int = 1000, seed: int = 0) -> Report:
    """Per-budget parabolas of the loss at T = μ_rec in ln μ_rec, their minima μ*(C) and D*(C), and the power
    laws through them (every budget needs ≥ 3 recurrences; profiles without a minimum are reported, not used)."""
    rows = results.at_training_depth()
    budgets = np.unique(rows.budget_flops)
    per_budget, valid, fits = [], [], []  # fits: x, y, fitted y, FLOPs-per-token line, budget, has a minimum
    for budget in budgets:
        mask = rows.budget_flops == budget
        mu, loss, tokens = rows.mean_recurrence[mask], rows.val_loss[mask], rows.tokens[mask]
        if len(np.unique(mu)) != len(mu):
            raise FitError(f"budget {budget:.4g} has two rows at the same mean_recurrence at T = μ_rec.")
        if len(mu) < 3:
            listed = ", ".join(f"{m:g}" for m in sorted(mu))
            raise FitError(f"budget {budget:.4g} has {len(mu)} point(s) (μ_rec {listed}); a parabola needs at least 3.")
        x = np.log(mu)
        coefficients, x_opt = _parabola_minimum(x, loss)
        # FLOPs per token are affine in μ_rec (a fixed part plus the core per iteration): fit them from C/D.
        line = np.polyfit(mu, budget / tokens, 1)
        entry: dict[str, Any] = {"budget_flops": float(budget), "points": len(mu), "mean_recurrence": mu.tolist()}
        entry.update(val_loss=loss.tolist(), parabola_ln_mu=coefficients.tolist())
        if x_opt is None:
            entry.update(status="no minimum (the parabola opens downward)", mu_opt=None, tokens_opt=None)
        else:
            mu_opt = math.exp(x_opt)
            entry.update(status="ok", mu_opt=mu_opt, tokens_opt=float(budget / np.polyval(line, mu_opt)))
            in_range = bool(mu.min() <= mu_opt <= mu.max())
            entry.update(loss_opt=float(np.polyval(coefficients, x_opt)), in_sampled_range=in_range)
            valid.append(entry)
        per_budget.append(entry)
        fits.append((x, loss, np.polyval(coefficients, x), line, budget, x_opt is not None))
    if len(valid) < 2:
        raise FitError(f"only {len(valid)} of {len(budgets)} budgets have a parabola with a minimum (2 needed).")
    c = np.array([e["budget_flops"] for e in valid])
    intervals = _isoflop_bootstrap(fits, bootstrap, seed)
    report: Report = {"kind": "isoflop", "budgets": per_budget}
    for key, law in (("mu_opt", "mu_law"), ("tokens_opt", "tokens_law")):
        prefactor, exponent, stderr = _power_law(c, np.array([e[key] for e in valid]))
        report[law] = {"prefactor": prefactor, "exponent": exponent, "exponent_stderr": stderr} | intervals.get(key, {})
    report["bootstrap"] = intervals.get("info", {})
    outside = [f"{e['budget_flops']:.4g}" for e in valid if not e["in_sampled_range"]]
    if outside:
        report["warning"] = f"the minimum lies outside the sampled μ_rec range at budget(s) {', '.join(outside)}."
    return report


def _isoflop_bootstrap(fits: list[tuple[Any, ...]], replicates: int, seed: int) -> dict[str, Any]:
    """Residual bootstrap: each budget's parabola refitted to fitted + resampled (rescaled) residuals."""
    if replicates <= 0:
        return {}
    if all(len(x) == 3 for x, *_ in fits):
        note = "every budget has 3 points, which its parabola interpolates: no residuals to resample, no bootstrap CIs."
        return {"info": {"replicates": 0, "note": note}}
    rng = np.random.default_rng(seed)
    used = [fit for fit in fits if fit[-1]]
    c = np.array([budget for *_, budget, _ in used])
    kept: dict[str, list[tuple[float, float]]] = {"mu_opt": [], "tokens_opt": []}
    for _ in range(replicates):
        mus, tokens = [], []
        for x, y, fitted, line, budget, _ in used:
            residual = (y - fitted) * math.sqrt(len(x) / max(len(x) - 3, 1))
            _, x_opt = _parabola_minimum(x, fitted + rng.choice(residual, len(x)))
            if x_opt is None:
                break
            mus.append(math.exp(x_opt))
            tokens.append(budget / np.polyval(line, math.exp(x_opt)))
        else:
            for key, values in (("mu_opt", mus), ("tokens_opt", tokens)):
                kept[key].append(_power_law(c, np.array(values))[:2])
    out: dict[str, Any] = {"info": {"replicates": replicates, "with_minima": len(kept["mu_opt"])}}
    if len(kept["mu_opt"]) >= 10:
        for key, samples in kept.items():
            array = np.array(samples)
            out[key] = {"prefactor_ci95": ci95(array[:, 0]), "exponent_ci95": ci95(array[:, 1])}
    return out


def _terms(kind: str, rows: Results) -> list[Term]:
    """E + A·N^−a + B·D^−b (params), or E + X·N^−x + Y·D^−y + Z·e^{−z·T/μ_rec} (unified)."""
    n, d = ("A", "B") if kind == "params" else ("X", "Y")
    terms = [Term("E", None, np.zeros(len(rows))), Term(n, n.lower(), np.log(rows.params))]
    terms.append(Term(d, d.lower(), np.log(rows.tokens)))
    if kind == "unified":
        terms.append(Term("Z", "z", rows.eval_depth / rows.mean_recurrence))
    return terms


def _fit_law(kind: str, rows: Results, held: Results | None, restarts: int, bootstrap: int, seed: int) -> Report:
    terms = _terms(kind, rows)
    n_params = len(terms) + sum(t.exponent_name is not None for t in terms)
    if len(rows) <= n_params:
        raise FitError(f"the {kind} law has {n_params} parameters but {rows.source} gives only {len(rows)} points.")
    law = SumOfTerms(terms, rows.val_loss)
    theta = law.fit(restarts, seed, kind)
    report: Report = {"kind": kind, "restarts": restarts, **law.report(theta, bootstrap, seed)}
    report.update(predicted=np.exp(law.log_predict(theta)).tolist(), observed=rows.val_loss.tolist())
    if held is not None:
        predicted = np.exp(law.log_predict(theta, np.stack([t.feature for t in _terms(kind, held)], axis=1)))
        huber_mean = float(huber(np.log(predicted) - np.log(held.val_loss)).mean())
        report["holdout"] = {"source": held.source, "points": len(held), "mape_percent": mape(predicted, held.val_loss)}
        report["holdout"].update(huber_mean=huber_mean, predicted=predicted.tolist(), observed=held.val_loss.tolist())
    return report


def fit_params(
    results: Results, *, holdout: Results | None = None, restarts: int = 200, bootstrap: int = 200, seed: int = 0
) -> Report:
    """L = E + A·N^−a + B·D^−b on the loss at T = μ_rec (paper Eq. 7; Table 11 reports E, A, a, B, b)."""
    held = holdout.at_training_depth() if holdout is not None else None
    return _fit_law("params", results.at_training_depth(), held, restarts, bootstrap, seed)


def fit_unified(
    results: Results, *, holdout: Results | None = None, restarts: int = 200, bootstrap: int = 200, seed: int = 0
) -> Report:
    """L = E + X·N^−x + Y·D^−y + Z·e^{−z·T/μ_rec} on every row (paper Eq. 4). With a holdout, also the
    "oracle" error: the floor E + X·N^−x + Y·D^−y replaced by each held-out run's loss at T = μ_rec."""
    report = _fit_law("unified", results, holdout, restarts, bootstrap, seed)
    if holdout is not None:
        at_mean = holdout.eval_depth == holdout.mean_recurrence
        floors = dict(zip(holdout.run[at_mean], holdout.val_loss[at_mean], strict=True))
        has_floor = np.array([name in floors for name in holdout.run])
        if has_floor.any():
            rows, p = holdout.select(has_floor), report["parameters"]
            decay = p["Z"] * np.exp(-p["z"] * rows.eval_depth / rows.mean_recurrence)
            oracle = np.array([floors[n] for n in rows.run]) + decay
            report["holdout"]["oracle_mape_percent"] = mape(oracle, rows.val_loss)
    return report


@dataclass(frozen=True)
class TestTimeForm:
    name: str
    formula: str
    parameters: tuple[str, ...]
    function: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def log_residual(self, p: np.ndarray, depths: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(self.function(depths, p), 1e-300)) - log_loss


_FLOORED = ("L_inf", "Z", "z")
TESTTIME_FORMS = (
    TestTimeForm("exponential", "L∞ + Z·exp(−z·T)", _FLOORED, lambda t, p: p[0] + p[1] * np.exp(-p[2] * t)),
    TestTimeForm("shifted_power", "L∞ + Z·(1+T)^−z", _FLOORED, lambda t, p: p[0] + p[1] * (1 + t) ** -p[2]),
    TestTimeForm("power", "L∞ + Z·T^−z", _FLOORED, lambda t, p: p[0] + p[1] * t ** -p[2]),
    TestTimeForm("power_no_floor", "Z·T^−z", ("Z", "z"), lambda t, p: p[0] * t ** -p[1]),
)
_MIN_FIT_POINTS = 3  # every form is fitted to at least as many points as the largest has parameters


def _curve_starts(form: TestTimeForm, depths: np.ndarray, loss: np.ndarray) -> list[np.ndarray]:
    """Cheap starts: Z·T^−z is a log-log line; floored forms are linear in (L∞, Z ≥ 0) at fixed z (best 2 of a grid)."""
    if len(form.parameters) == 2:
        slope, intercept = np.polyfit(np.log(depths), np.log(loss), 1)
        return [np.array([math.exp(intercept), max(-slope, 0.0)])]
    profile = []
    for rate in np.geomspace(1e-3, 20.0, 48):
        shape = form.function(depths, np.array([0.0, 1.0, rate]))
        design = np.stack([np.ones_like(shape), shape], axis=1)
        (floor, amplitude), *_ = np.linalg.lstsq(design, loss, rcond=None)
        p = np.array([max(floor, 0.0), max(amplitude, 0.0), rate])
        error = float(np.sum(form.log_residual(p, depths, np.log(loss)) ** 2))
        profile.append((error, p))
    profile.sort(key=lambda item: item[0])
    return [p for _, p in profile[:2]]


def fit_curve(form: TestTimeForm, depths: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Least squares on log-loss (as the paper): (parameters, standard errors or None when no dof is left)."""
    order = np.argsort(depths)
    depths, loss = depths[order], loss[order]
    fit_args = (depths, np.log(loss))
    best = None
    for start in _curve_starts(form, depths, loss):
        result = optimize.least_squares(form.log_residual, start, bounds=(0.0, np.inf), x_scale="jac", args=fit_args)
        if result.status > 0 and np.isfinite(result.cost) and (best is None or result.cost < best.cost):
            best = result
    if best is None:
        raise FitError(f"the {form.formula} fit did not converge.")
    dof = len(depths) - len(best.x)
    if dof <= 0:
        return best.x, None
    with np.errstate(all="ignore"):
        covariance = np.linalg.pinv(best.jac.T @ best.jac) * (2 * best.cost / dof)
    return best.x, np.sqrt(np.clip(np.diag(covariance), 0, None))


def _scores(depths: np.ndarray, loss: np.ndarray, fit_mask: np.ndarray, score_mask: np.ndarray) -> dict[str, Any]:
    """Every form fitted on the `fit_mask` rows and scored (mean Huber of log-loss) on the `score_mask` rows."""
    scores: dict[str, Any] = {}
    for form in TESTTIME_FORMS:
        try:
            p, stderr = fit_curve(form, depths[fit_mask], loss[fit_mask])
        except FitError as err:
            scores[form.name] = {"failed": str(err)}
            continue
        score = float(huber(np.log(form.function(depths[score_mask], p)) - np.log(loss[score_mask])).mean())
        scores[form.name] = {"huber": score, "parameters": dict(zip(form.parameters, p.tolist(), strict=True))}
        if stderr is not None:
            scores[form.name]["stderr"] = dict(zip(form.parameters, stderr.tolist(), strict=True))
    return scores


def fit_testtime(results: Results) -> Report:
    """Per run, every form's mean Huber loss in distribution (fit and score on all T) and extrapolating (fit on
    T ≤ μ_rec, score on T > μ_rec); then Table 12, averaged over the runs where every form was fitted and scored."""
    runs, columns = [], {"in_distribution": {}, "extrapolation": {}}
    for name in dict.fromkeys(results.run.tolist()):
        rows = results.select(results.run == name)
        order = np.argsort(rows.eval_depth)
        depths, loss = rows.eval_depth[order], rows.val_loss[order]
        mean = float(rows.mean_recurrence[0])
        entry: dict[str, Any] = {"run": name, "mean_recurrence": mean, "budget_flops": float(rows.budget_flops[0])}
        entry.update(eval_depth=depths.tolist(), val_loss=loss.tolist())
        everywhere = np.ones_like(depths, bool)
        splits = {"in_distribution": (everywhere, everywhere), "extrapolation": (depths <= mean, depths > mean)}
        for setting, (fit_mask, score_mask) in splits.items():
            if fit_mask.sum() < _MIN_FIT_POINTS or not score_mask.any():
                entry[setting] = {"skipped": f"{int(fit_mask.sum())} depth(s) to fit, {int(score_mask.sum())} to score"}
                continue
            entry[setting] = scores = _scores(depths, loss, fit_mask, score_mask)
            if all("huber" in s for s in scores.values()):
                columns[setting][name] = {f: s["huber"] for f, s in scores.items()}
        runs.append(entry)
    if not columns["in_distribution"]:
        raise FitError(f"no run in {results.source} has the {_MIN_FIT_POINTS}+ eval depths a test-time fit needs.")
    table = []
    for form in TESTTIME_FORMS:
        row: dict[str, Any] = {"form": form.name, "formula": form.formula}
        for setting, scored in columns.items():
            values = [v[form.name] for v in scored.values()]
            row[setting] = float(np.mean(values)) if values else None
            row[f"{setting}_runs"] = len(values)
        table.append(row)
    ranking = {s: [r["form"] for r in sorted(table, key=lambda r: r[s])] for s in columns if columns[s]}
    return {"kind": "testtime", "huber_delta": HUBER_DELTA, "table": table, "ranking": ranking, "runs": runs}


def format_fit(report: Report) -> str:
    kind = report["kind"]
    lines: list[str] = []
    if kind == "isoflop":
        lines.append(f"{'budget C':>10}  {'points':>6}  {'μ*':>8}  {'D*':>12}  status")
        for b in report["budgets"]:
            mu = f"{b['mu_opt']:.3f}" if b["mu_opt"] is not None else "-"
            tokens = f"{b['tokens_opt']:.4g}" if b["tokens_opt"] is not None else "-"
            status = b["status"] + ("" if b.get("in_sampled_range", True) else " (outside the sampled range)")
            lines.append(f"{b['budget_flops']:>10.4g}  {b['points']:>6}  {mu:>8}  {tokens:>12}  {status}")
        for key, symbol in (("mu_law", "μ*"), ("tokens_law", "D*")):
            law = report[key]
            ci = law.get("exponent_ci95")
            ci_text = f", 95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            lines.append(f"{symbol} = {law['prefactor']:.4g} · C^{law['exponent']:.3f}{ci_text}")
    elif kind in ("params", "unified"):
        lines.append("  ".join(f"{k} = {v:.4g}" for k, v in report["parameters"].items()))
        for name, u in report["uncertainty"].items():
            lines.append(f"  {name}: std {u['std']:.3g}, 95% CI [{u['ci95'][0]:.4g}, {u['ci95'][1]:.4g}]")
        points = f"{report['mape_percent']:.3f} % on {report['points']} points"
        lines.append(f"mean Huber {report['huber_mean']:.3g} (δ = {HUBER_DELTA:g}), in-sample MAPE {points}")
        if "holdout" in report:
            h = report["holdout"]
            oracle = f", oracle floor {h['oracle_mape_percent']:.3f} %" if "oracle_mape_percent" in h else ""
            lines.append(f"held-out MAPE {h['mape_percent']:.3f} % on {h['points']} points{oracle}")
    else:
        lines.append(f"{'form':<22} {'in-dist (×1e-7)':>16} {'runs':>5} {'extrap (×1e-7)':>16} {'runs':>5}")
        for row in report["table"]:
            cells = [f"{row['formula']:<22}"]
            for setting in ("in_distribution", "extrapolation"):
                value = "-" if row[setting] is None else f"{row[setting] * 1e7:.3f}"
                cells += [f"{value:>16}", f"{row[setting + '_runs']:>5}"]
            lines.append(" ".join(cells))
        for setting, order in report["ranking"].items():
            lines.append(f"ranking ({setting}): {' < '.join(order)}")
    if report.get("warning"):
        lines.append(f"warning: {report['warning']}")
    return "\n".join(lines)
