"""The paper's scaling-law fits (its §5), each from a sweep's results CSV (`sweep.RESULT_COLUMNS`).

- `fit_isoflop`: per budget C a parabola of the loss at T = μ_rec in ln μ_rec; its minimum gives μ*(C) and
  D*(C) = C / (FLOPs per token at μ*); then μ* = a·C^γμ and D* = b·C^γD by least squares in log-log, with
  residual-bootstrap confidence intervals.
- `fit_params`: L = E + A·N^−a + B·D^−b (N = N(μ_rec), the unrolled parameter count; D = tokens) on the loss
  at T = μ_rec (paper Eq. 7).
- `fit_testtime`: per run L(T) = L∞ + Z·e^{−zT}, against the three alternatives of the paper's Table 12,
  in distribution and extrapolating (fit on T ≤ μ_rec, score on T > μ_rec).
- `fit_unified`: L = E + X·N^−x + Y·D^−y + Z·e^{−z·T/μ_rec} on every row (paper Eq. 4).

The parametric laws are fitted as in the paper (after Hoffmann et al.): every term is positive, so the
prediction is logsumexp of the terms' logarithms; the Huber loss (δ = 1e-3) of log-prediction − log-loss is
minimised with L-BFGS from many seeded random starts, and the best converged start is kept.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize

from .sweep import RESULT_COLUMNS

HUBER_DELTA = 1e-3
_NUMERIC = RESULT_COLUMNS[1:]
_MAX_EXPONENT = 10.0


class FitError(ValueError):
    """A fit that these data cannot support, or that did not converge; the message says which."""


# ---------------------------------------------------------------------- the results CSV
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
        columns = {name: getattr(self, name)[mask] for name in RESULT_COLUMNS}
        return Results(**columns, source=self.source)

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
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in RESULT_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path} lacks column(s) {', '.join(missing)} (expected {','.join(RESULT_COLUMNS)}).")
        names: list[str] = []
        values: dict[str, list[float]] = {c: [] for c in _NUMERIC}
        seen: set[tuple[str, float]] = set()
        for line, row in enumerate(reader, start=2):
            for column in _NUMERIC:
                text = (row.get(column) or "").strip()
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError(f"{path} line {line}: {column} is not a number ({text!r}).") from None
                if not math.isfinite(value):
                    raise ValueError(f"{path} line {line}: {column} is {text} (every value must be finite).")
                if value <= 0:
                    raise ValueError(f"{path} line {line}: {column} must be positive, got {text}.")
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


# ---------------------------------------------------------------------- shared numerics
def huber(residuals: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Huber loss per residual: ½r² inside ±δ, linear outside."""
    a = np.abs(residuals)
    return np.where(a <= delta, 0.5 * residuals**2, delta * (a - 0.5 * delta))


def _mape(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Mean absolute percentage error."""
    return float(np.mean(np.abs(predicted - observed) / observed) * 100.0)


def _interval(samples: np.ndarray) -> list[float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """Stable log Σ_j exp(x_ij) per row (plain numpy: scipy's version costs ~50× more per call here)."""
    peak = x.max(axis=1)
    return peak + np.log(np.exp(x - peak[:, None]).sum(axis=1))


@dataclass(frozen=True)
class _Term:
    """One positive term exp(scale − exponent·feature) of a parametric law (exponent None: a constant)."""

    scale_name: str  # reported as exp(scale)
    exponent_name: str | None
    feature: np.ndarray


class _SumOfTerms:
    """log L̂ = logsumexp_j (s_j − p_j·F_j), fitted by Huber loss on log L with L-BFGS (analytic gradient).

    Internally each feature is centred (F − F̄, with s'_j = s_j − p_j·F̄_j): otherwise s_j and p_j are almost
    collinear (ln N varies by a few units around ~15) and L-BFGS crawls along that valley.
    """

    def __init__(self, terms: Sequence[_Term], loss: np.ndarray) -> None:
        self.terms = list(terms)
        self.has_exponent = np.array([t.exponent_name is not None for t in terms])
        self.log_y = np.log(loss)
        raw = np.stack([t.feature if t.exponent_name else np.zeros_like(loss) for t in terms], axis=1)
        self.centers = raw.mean(0)
        self.features = raw - self.centers
        self.n_scales = len(terms)

    def _split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        exponents = np.zeros(self.n_scales)
        exponents[self.has_exponent] = theta[self.n_scales :]
        return theta[: self.n_scales], exponents

    def log_predict(self, theta: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """log L̂ at the fitted rows, or at other rows' raw (uncentred) `features`."""
        scales, exponents = self._split(theta)
        features = self.features if features is None else features - self.centers
        return _logsumexp_rows(scales - exponents * features)

    def objective(self, theta: np.ndarray, rows: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        features = self.features if rows is None else self.features[rows]
        log_y = self.log_y if rows is None else self.log_y[rows]
        scales, exponents = self._split(theta)
        logits = scales - exponents * features
        log_prediction = _logsumexp_rows(logits)
        residual = log_prediction - log_y
        weights = np.exp(logits - log_prediction[:, None])  # each term's share of the prediction
        psi = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)[:, None]
        # Scaled by 1/δ² so that L-BFGS's tolerances see numbers of order one.
        value = float(huber(residual).sum()) / HUBER_DELTA**2
        grad_scales = (psi * weights).sum(0)
        grad_exponents = -(psi * weights * features).sum(0)[self.has_exponent]
        return value, np.concatenate([grad_scales, grad_exponents]) / HUBER_DELTA**2

    def random_start(self, rng: np.random.Generator) -> np.ndarray:
        """Each term starts at a random fraction of the loss scale with a random exponent in [0, 2]."""
        level = float(np.exp(self.log_y.min()))
        scales, exponents = [], []
        for term in self.terms:
            if term.exponent_name is None:
                scales.append(math.log(level * rng.uniform(0.1, 1.0)))
            else:
                exponents.append(rng.uniform(0.0, 2.0))
                scales.append(math.log(level * rng.uniform(0.01, 1.0)))
        return np.array(scales + exponents)

    def minimise(self, start: np.ndarray, rows: np.ndarray | None = None) -> optimize.OptimizeResult:
        bounds = [(None, None)] * self.n_scales + [(0.0, _MAX_EXPONENT)] * int(self.has_exponent.sum())
        return optimize.minimize(
            self.objective, start, args=(rows,), jac=True, method="L-BFGS-B", bounds=bounds,
            options={"maxiter": 10_000, "ftol": 1e-10, "gtol": 1e-6},
        )  # fmt: skip

    def fit(self, restarts: int, seed: int, what: str) -> np.ndarray:
        rng = np.random.default_rng(seed)
        best: optimize.OptimizeResult | None = None
        failures = 0
        for _ in range(restarts):
            result = self.minimise(self.random_start(rng))
            if not (result.success and np.isfinite(result.fun)):
                failures += 1
                continue
            if best is None or result.fun < best.fun:
                best = result
        if best is None:
            raise FitError(f"the {what} fit did not converge from any of {restarts} random starts.")
        return best.x

    def bootstrap(self, theta: np.ndarray, replicates: int, seed: int) -> np.ndarray:
        """Refits on rows resampled with replacement, each started at `theta`; converged replicates only."""
        rng = np.random.default_rng(seed)
        n = len(self.log_y)
        samples = []
        for _ in range(replicates):
            result = self.minimise(theta, rng.integers(0, n, n))
            if result.success and np.isfinite(result.fun):
                samples.append(result.x)
        return np.array(samples).reshape(-1, len(theta))

    def named(self, theta: np.ndarray) -> dict[str, float]:
        scales, exponents = self._split(theta)
        out: dict[str, float] = {}
        for term, s, p, center in zip(self.terms, scales, exponents, self.centers, strict=True):
            out[term.scale_name] = float(np.exp(s + p * center))
            if term.exponent_name is not None:
                out[term.exponent_name] = float(p)
        return out

    def report(self, theta: np.ndarray, replicates: int, seed: int) -> dict[str, Any]:
        """Parameters, their bootstrap uncertainty and the in-sample errors."""
        predicted = np.exp(self.log_predict(theta))
        residual = np.log(predicted) - self.log_y
        samples = self.bootstrap(theta, replicates, seed) if replicates else np.zeros((0, len(theta)))
        named_samples = [self.named(s) for s in samples]
        uncertainty = {
            name: {"std": float(np.std(values)), "ci95": _interval(values)}
            for name in self.named(theta)
            if len(values := np.array([s[name] for s in named_samples])) >= 10
        }
        at_bound = [
            t.exponent_name for t, p in zip(self.terms, self._split(theta)[1], strict=True)
            if t.exponent_name and (p < 1e-4 or p > _MAX_EXPONENT - 1e-4)
        ]  # fmt: skip
        report: dict[str, Any] = {
            "parameters": self.named(theta),
            "uncertainty": uncertainty,
            "bootstrap": {"replicates": replicates, "converged": len(samples)},
            "huber_mean": float(huber(residual).mean()),
            "huber_total": float(huber(residual).sum()),
            "mape_percent": _mape(predicted, np.exp(self.log_y)),
            "points": len(self.log_y),
        }
        if at_bound:
            report["warning"] = (
                f"exponent(s) {', '.join(at_bound)} at a bound (0 or {_MAX_EXPONENT:g}): these data do not "
                "identify that term."
            )
        return report


# ---------------------------------------------------------------------- isoFLOP
def _parabola_minimum(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float | None]:
    coefficients = np.polyfit(x, y, 2)
    if coefficients[0] <= 0:
        return coefficients, None
    return coefficients, float(-coefficients[1] / (2 * coefficients[0]))


def _power_law(budgets: np.ndarray, values: np.ndarray) -> tuple[float, float, float | None]:
    """(prefactor, exponent, standard error of the exponent) of values = prefactor · budgets^exponent."""
    x, y = np.log(budgets), np.log(values)
    if len(x) < 2 or np.ptp(x) == 0:
        raise FitError("a power law in C needs minima at two or more budgets.")
    slope, intercept = np.polyfit(x, y, 1)
    stderr = None
    if len(x) > 2:
        residual = y - (intercept + slope * x)
        stderr = float(math.sqrt(float(residual @ residual) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum())))
    return float(math.exp(intercept)), float(slope), stderr


def fit_isoflop(results: Results, *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-budget parabolas of the loss at T = μ_rec in ln μ_rec, their minima μ*(C) and D*(C), and the power
    laws through them (every budget needs ≥ 3 recurrences; profiles without a minimum are reported, not used)."""
    rows = results.at_training_depth()
    budgets = np.unique(rows.budget_flops)
    per_budget, valid = [], []
    fits: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # x, y, fitted, per-token line
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
        entry: dict[str, Any] = {
            "budget_flops": float(budget),
            "points": len(mu),
            "mean_recurrence": mu.tolist(),
            "val_loss": loss.tolist(),
            "parabola_ln_mu": coefficients.tolist(),
        }
        if x_opt is None:
            entry.update(status="no minimum (the parabola opens downward)", mu_opt=None, tokens_opt=None)
        else:
            mu_opt = math.exp(x_opt)
            entry.update(
                status="ok",
                mu_opt=mu_opt,
                tokens_opt=float(budget / np.polyval(line, mu_opt)),
                loss_opt=float(np.polyval(coefficients, x_opt)),
                in_sampled_range=bool(mu.min() <= mu_opt <= mu.max()),
            )
            valid.append(entry)
        per_budget.append(entry)
        fits.append((x, loss, np.polyval(coefficients, x), line))
    if len(valid) < 2:
        raise FitError(
            f"only {len(valid)} of {len(budgets)} budgets have a parabola with a minimum; the power laws need two."
        )
    c = np.array([e["budget_flops"] for e in valid])
    mu_law = _power_law(c, np.array([e["mu_opt"] for e in valid]))
    tokens_law = _power_law(c, np.array([e["tokens_opt"] for e in valid]))
    intervals = _isoflop_bootstrap(fits, budgets, [e["status"] == "ok" for e in per_budget], bootstrap, seed)
    laws = {}
    for key, (prefactor, exponent, stderr) in (("mu_opt", mu_law), ("tokens_opt", tokens_law)):
        laws[key] = {"prefactor": prefactor, "exponent": exponent, "exponent_stderr": stderr,
                     **intervals.get(key, {})}  # fmt: skip
    outside = [f"{e['budget_flops']:.4g}" for e in valid if not e["in_sampled_range"]]
    report: dict[str, Any] = {
        "kind": "isoflop",
        "budgets": per_budget,
        "mu_law": laws["mu_opt"],
        "tokens_law": laws["tokens_opt"],
        "bootstrap": intervals.get("info", {}),
    }
    if outside:
        report["warning"] = f"the minimum lies outside the sampled μ_rec range at budget(s) {', '.join(outside)}."
    return report


def _isoflop_bootstrap(
    fits: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    budgets: np.ndarray,
    used: list[bool],
    replicates: int,
    seed: int,
) -> dict[str, Any]:
    """Residual bootstrap: each budget's parabola refitted to fitted + resampled (rescaled) residuals."""
    if replicates <= 0:
        return {}
    if all(len(x) == 3 for x, *_ in fits):
        return {"info": {"replicates": 0, "note": "every budget has exactly 3 points, so its parabola interpolates "
                         "them and there are no residuals to resample: no bootstrap intervals."}}  # fmt: skip
    rng = np.random.default_rng(seed)
    kept: dict[str, list[tuple[float, float]]] = {"mu_opt": [], "tokens_opt": []}
    for _ in range(replicates):
        mus, tokens, cs = [], [], []
        for (x, y, fitted, line), budget, use in zip(fits, budgets, used, strict=True):
            if not use:
                continue
            residual = (y - fitted) * math.sqrt(len(x) / max(len(x) - 3, 1))
            _, x_opt = _parabola_minimum(x, fitted + rng.choice(residual, len(x)))
            if x_opt is None:
                break
            mus.append(math.exp(x_opt))
            tokens.append(budget / np.polyval(line, math.exp(x_opt)))
            cs.append(budget)
        else:
            for key, values in (("mu_opt", mus), ("tokens_opt", tokens)):
                prefactor, exponent, _ = _power_law(np.array(cs), np.array(values))
                kept[key].append((prefactor, exponent))
    out: dict[str, Any] = {"info": {"replicates": replicates, "with_minima": len(kept["mu_opt"])}}
    if len(kept["mu_opt"]) >= 10:
        for key, samples in kept.items():
            array = np.array(samples)
            out[key] = {"prefactor_ci95": _interval(array[:, 0]), "exponent_ci95": _interval(array[:, 1])}
    return out


# ---------------------------------------------------------------------- training law and unified law
def _training_terms(rows: Results) -> list[_Term]:
    return [
        _Term("E", None, np.zeros(len(rows))),
        _Term("A", "a", np.log(rows.params)),
        _Term("B", "b", np.log(rows.tokens)),
    ]


def _unified_terms(rows: Results) -> list[_Term]:
    return [
        _Term("E", None, np.zeros(len(rows))),
        _Term("X", "x", np.log(rows.params)),
        _Term("Y", "y", np.log(rows.tokens)),
        _Term("Z", "z", rows.eval_depth / rows.mean_recurrence),
    ]


def _holdout_report(
    law: _SumOfTerms, theta: np.ndarray, terms: list[_Term], rows: Results
) -> tuple[dict[str, Any], np.ndarray]:
    features = np.stack([t.feature for t in terms], axis=1)
    predicted = np.exp(law.log_predict(theta, features))
    report = {
        "source": rows.source,
        "points": len(rows),
        "mape_percent": _mape(predicted, rows.val_loss),
        "huber_mean": float(huber(np.log(predicted) - np.log(rows.val_loss)).mean()),
    }
    return report, predicted


def _fit_law(
    kind: str,
    rows: Results,
    terms_of: Callable[[Results], list[_Term]],
    holdout_rows: Results | None,
    restarts: int,
    bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    terms = terms_of(rows)
    n_params = len(terms) + sum(t.exponent_name is not None for t in terms)
    if len(rows) <= n_params:
        raise FitError(f"the {kind} law has {n_params} parameters but {rows.source} gives only {len(rows)} points.")
    law = _SumOfTerms(terms, rows.val_loss)
    theta = law.fit(restarts, seed, kind)
    report: dict[str, Any] = {"kind": kind, "restarts": restarts, **law.report(theta, bootstrap, seed)}
    report["predicted"] = np.exp(law.log_predict(theta)).tolist()
    report["observed"] = rows.val_loss.tolist()
    if holdout_rows is not None:
        held, predicted = _holdout_report(law, theta, terms_of(holdout_rows), holdout_rows)
        report["holdout"] = {**held, "predicted": predicted.tolist(), "observed": holdout_rows.val_loss.tolist()}
    return report


def fit_params(
    results: Results, *, holdout: Results | None = None, restarts: int = 200, bootstrap: int = 200, seed: int = 0
) -> dict[str, Any]:
    """L = E + A·N^−a + B·D^−b on the loss at T = μ_rec (paper Eq. 7; Table 11 reports E, A, a, B, b)."""
    held = holdout.at_training_depth() if holdout is not None else None
    return _fit_law("params", results.at_training_depth(), _training_terms, held, restarts, bootstrap, seed)


def fit_unified(
    results: Results, *, holdout: Results | None = None, restarts: int = 200, bootstrap: int = 200, seed: int = 0
) -> dict[str, Any]:
    """L = E + X·N^−x + Y·D^−y + Z·e^{−z·T/μ_rec} on every row (paper Eq. 4). With a holdout, also the
    "oracle" error: the floor E + X·N^−x + Y·D^−y replaced by each held-out run's loss at T = μ_rec."""
    report = _fit_law("unified", results, _unified_terms, holdout, restarts, bootstrap, seed)
    if holdout is not None:
        p = report["parameters"]
        floors = {}
        for name, depth, mean, loss in zip(
            holdout.run, holdout.eval_depth, holdout.mean_recurrence, holdout.val_loss, strict=True
        ):
            if depth == mean:
                floors[name] = loss
        has_floor = np.array([name in floors for name in holdout.run])
        if has_floor.any():
            rows = holdout.select(has_floor)
            oracle = np.array([floors[n] for n in rows.run]) + p["Z"] * np.exp(
                -p["z"] * rows.eval_depth / rows.mean_recurrence
            )
            report["holdout"]["oracle_mape_percent"] = _mape(oracle, rows.val_loss)
    return report


# ---------------------------------------------------------------------- test-time scaling
@dataclass(frozen=True)
class TestTimeForm:
    name: str
    formula: str
    parameters: tuple[str, ...]
    function: Callable[[np.ndarray, np.ndarray], np.ndarray]


TESTTIME_FORMS = (
    TestTimeForm("exponential", "L∞ + Z·exp(−z·T)", ("L_inf", "Z", "z"), lambda t, p: p[0] + p[1] * np.exp(-p[2] * t)),
    TestTimeForm("shifted_power", "L∞ + Z·(1+T)^−z", ("L_inf", "Z", "z"), lambda t, p: p[0] + p[1] * (1 + t) ** -p[2]),
    TestTimeForm("power", "L∞ + Z·T^−z", ("L_inf", "Z", "z"), lambda t, p: p[0] + p[1] * t ** -p[2]),
    TestTimeForm("power_no_floor", "Z·T^−z", ("Z", "z"), lambda t, p: p[0] * t ** -p[1]),
)  # fmt: skip
_MIN_FIT_POINTS = 3  # every form is fitted to at least as many points as the largest has parameters


def _curve_starts(form: TestTimeForm, depths: np.ndarray, loss: np.ndarray) -> list[np.ndarray]:
    """Good starting points, cheaply. Z·T^−z is a line in log-log. The floored forms are linear in (L∞, Z)
    once z is fixed, so z is profiled over a grid (linear least squares for L∞, Z ≥ 0 at each z) and the two
    best grid points are kept."""
    if len(form.parameters) == 2:
        slope, intercept = np.polyfit(np.log(depths), np.log(loss), 1)
        return [np.array([math.exp(intercept), max(-slope, 0.0)])]
    profile = []
    for rate in np.geomspace(1e-3, 20.0, 48):
        shape = form.function(depths, np.array([0.0, 1.0, rate]))
        design = np.stack([np.ones_like(shape), shape], axis=1)
        (floor, amplitude), *_ = np.linalg.lstsq(design, loss, rcond=None)
        p = np.array([max(floor, 0.0), max(amplitude, 0.0), rate])
        error = float(np.sum((np.log(np.maximum(form.function(depths, p), 1e-300)) - np.log(loss)) ** 2))
        profile.append((error, p))
    profile.sort(key=lambda item: item[0])
    return [p for _, p in profile[:2]]


def fit_curve(form: TestTimeForm, depths: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Least squares on log-loss (as the paper); (parameters, standard errors or None when no dof is left).

    Raises FitError when no start converges.
    """
    order = np.argsort(depths)
    depths, loss = depths[order], loss[order]
    log_y = np.log(loss)

    def residual(p: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(form.function(depths, p), 1e-300)) - log_y

    best = None
    for start in _curve_starts(form, depths, loss):
        result = optimize.least_squares(residual, start, bounds=(0.0, np.inf), x_scale="jac")
        if result.status > 0 and np.isfinite(result.cost) and (best is None or result.cost < best.cost):
            best = result
    if best is None:
        raise FitError(f"the {form.formula} fit did not converge.")
    stderr = None
    dof = len(depths) - len(best.x)
    if dof > 0:
        with np.errstate(all="ignore"):
            covariance = np.linalg.pinv(best.jac.T @ best.jac) * (2 * best.cost / dof)
        stderr = np.sqrt(np.clip(np.diag(covariance), 0, None))
    return best.x, stderr


def _score(form: TestTimeForm, p: np.ndarray, depths: np.ndarray, loss: np.ndarray) -> float:
    return float(huber(np.log(form.function(depths, p)) - np.log(loss)).mean())


def fit_testtime(results: Results) -> dict[str, Any]:
    """Per run: the exponential law's parameters, and every form's average Huber loss in distribution (fit
    and score on all T) and extrapolating (fit on T ≤ μ_rec, score on T > μ_rec); then the Table 12
    comparison, averaged over the runs that every form could be fitted and scored on."""
    runs, columns = [], {"in_distribution": {}, "extrapolation": {}}
    names = list(dict.fromkeys(results.run.tolist()))
    for name in names:
        rows = results.select(results.run == name)
        order = np.argsort(rows.eval_depth)
        depths, loss = rows.eval_depth[order], rows.val_loss[order]
        mean = float(rows.mean_recurrence[0])
        entry: dict[str, Any] = {"run": name, "mean_recurrence": mean, "budget_flops": float(rows.budget_flops[0]),
                                 "eval_depth": depths.tolist(), "val_loss": loss.tolist()}  # fmt: skip
        for setting, fit_mask, score_mask in (
            ("in_distribution", np.ones_like(depths, bool), np.ones_like(depths, bool)),
            ("extrapolation", depths <= mean, depths > mean),
        ):
            if fit_mask.sum() < _MIN_FIT_POINTS or not score_mask.any():
                entry[setting] = {"skipped": f"{int(fit_mask.sum())} depth(s) to fit, {int(score_mask.sum())} to score"}
                continue
            scores: dict[str, Any] = {}
            for form in TESTTIME_FORMS:
                try:
                    p, stderr = fit_curve(form, depths[fit_mask], loss[fit_mask])
                except FitError as err:
                    scores[form.name] = {"failed": str(err)}
                    continue
                scores[form.name] = {"huber": _score(form, p, depths[score_mask], loss[score_mask]),
                                     "parameters": dict(zip(form.parameters, p.tolist(), strict=True))}  # fmt: skip
                if stderr is not None:
                    scores[form.name]["stderr"] = dict(zip(form.parameters, stderr.tolist(), strict=True))
            entry[setting] = scores
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
    ranking = {
        setting: [r["form"] for r in sorted(table, key=lambda r: r[setting])] for setting in columns if columns[setting]
    }
    return {"kind": "testtime", "huber_delta": HUBER_DELTA, "table": table, "ranking": ranking, "runs": runs}


# ---------------------------------------------------------------------- text summaries
def format_fit(report: dict[str, Any]) -> str:
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
        p = report["parameters"]
        lines.append("  ".join(f"{k} = {v:.4g}" for k, v in p.items()))
        for name, u in report["uncertainty"].items():
            lines.append(f"  {name}: std {u['std']:.3g}, 95% CI [{u['ci95'][0]:.4g}, {u['ci95'][1]:.4g}]")
        lines.append(f"mean Huber {report['huber_mean']:.3g} (δ = {HUBER_DELTA:g}), in-sample MAPE "
                     f"{report['mape_percent']:.3f} % on {report['points']} points")  # fmt: skip
        if "holdout" in report:
            h = report["holdout"]
            oracle = f", oracle floor {h['oracle_mape_percent']:.3f} %" if "oracle_mape_percent" in h else ""
            lines.append(f"held-out MAPE {h['mape_percent']:.3f} % on {h['points']} points{oracle}")
    else:
        lines.append(f"{'form':<22} {'in-dist (×1e-7)':>16} {'runs':>5} {'extrap (×1e-7)':>16} {'runs':>5}")
        for row in report["table"]:
            cells = []
            for setting in ("in_distribution", "extrapolation"):
                value = row[setting]
                cells.append(f"{value * 1e7:>16.3f}" if value is not None else f"{'-':>16}")
                cells.append(f"{row[setting + '_runs']:>5}")
            lines.append(f"{row['formula']:<22} {' '.join(cells)}")
        for setting, order in report["ranking"].items():
            lines.append(f"ranking ({setting}): {' < '.join(order)}")
    if report.get("warning"):
        lines.append(f"warning: {report['warning']}")
    return "\n".join(lines)
