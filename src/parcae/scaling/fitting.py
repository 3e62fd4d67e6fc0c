"""The generic multi-start Huber fitter behind the parametric laws (as the paper, after Hoffmann et al.)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3
MAX_EXPONENT = 10.0
_LBFGS = {"method": "L-BFGS-B", "jac": True, "options": {"maxiter": 10_000, "ftol": 1e-10, "gtol": 1e-6}}


class FitError(ValueError):
    """A fit that these data cannot support, or that did not converge; the message says which."""


def huber(residuals: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Huber loss per residual: ½r² inside ±δ, linear outside."""
    a = np.abs(residuals)
    return np.where(a <= delta, 0.5 * residuals**2, delta * (a - 0.5 * delta))


def mape(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Mean absolute percentage error."""
    return float(np.mean(np.abs(predicted - observed) / observed) * 100.0)


def ci95(samples: np.ndarray) -> list[float]:
    return [float(bound) for bound in np.percentile(samples, [2.5, 97.5])]


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """Stable log Σ_j exp(x_ij) per row (plain numpy: scipy's version costs ~50× more per call here)."""
    peak = x.max(axis=1)
    return peak + np.log(np.exp(x - peak[:, None]).sum(axis=1))


@dataclass(frozen=True)
class Term:
    """One positive term exp(scale − exponent·feature) of a parametric law (exponent None: a constant)."""

    scale_name: str  # reported as exp(scale)
    exponent_name: str | None
    feature: np.ndarray


class SumOfTerms:
    """log L̂ = logsumexp_j (s_j − p_j·F_j), Huber loss on log L by L-BFGS (analytic gradient). Features are centred
    (s'_j = s_j − p_j·F̄_j), or s_j and p_j are almost collinear (ln N ≈ 15 ± a few) and L-BFGS crawls that valley."""

    def __init__(self, terms: Sequence[Term], loss: np.ndarray) -> None:
        self.terms = list(terms)
        self.has_exponent = np.array([t.exponent_name is not None for t in terms])
        self.log_y = np.log(loss)
        raw = np.stack([t.feature if t.exponent_name else np.zeros_like(loss) for t in terms], axis=1)
        self.centers = raw.mean(0)
        self.features = raw - self.centers
        self.n_scales = len(terms)
        self.bounds = [(None, None)] * self.n_scales + [(0.0, MAX_EXPONENT)] * int(self.has_exponent.sum())

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
        features, log_y = (self.features, self.log_y) if rows is None else (self.features[rows], self.log_y[rows])
        scales, exponents = self._split(theta)
        logits = scales - exponents * features
        log_prediction = _logsumexp_rows(logits)
        residual = log_prediction - log_y
        weights = np.exp(logits - log_prediction[:, None])  # each term's share of the prediction
        psi = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)[:, None]
        # Scaled by 1/δ² so that L-BFGS's tolerances see numbers of order one.
        value = float(huber(residual).sum()) / HUBER_DELTA**2
        grad_exponents = -(psi * weights * features).sum(0)[self.has_exponent]
        return value, np.concatenate([(psi * weights).sum(0), grad_exponents]) / HUBER_DELTA**2

    def random_start(self, rng: np.random.Generator) -> np.ndarray:
        """Each term starts at a random fraction of the loss scale with a random exponent in [0, 2]."""
        level = float(np.exp(self.log_y.min()))
        scales, exponents = [], []
        for term in self.terms:  # draws in this order: the exponent first, then the scale
            if term.exponent_name is not None:
                exponents.append(rng.uniform(0.0, 2.0))
            low = 0.1 if term.exponent_name is None else 0.01
            scales.append(math.log(level * rng.uniform(low, 1.0)))
        return np.array(scales + exponents)

    def minimise(self, start: np.ndarray, rows: np.ndarray | None = None) -> optimize.OptimizeResult:
        return optimize.minimize(self.objective, start, args=(rows,), bounds=self.bounds, **_LBFGS)

    def fit(self, restarts: int, seed: int, what: str) -> np.ndarray:
        """The best converged of `restarts` seeded random starts."""
        rng = np.random.default_rng(seed)
        best: optimize.OptimizeResult | None = None
        for _ in range(restarts):
            result = self.minimise(self.random_start(rng))
            if result.success and np.isfinite(result.fun) and (best is None or result.fun < best.fun):
                best = result
        if best is None:
            raise FitError(f"the {what} fit did not converge from any of {restarts} random starts.")
        return best.x

    def bootstrap(self, theta: np.ndarray, replicates: int, seed: int) -> np.ndarray:
        """Refits on rows resampled with replacement, each started at `theta`; converged replicates only."""
        rng = np.random.default_rng(seed)
        n = len(self.log_y)
        results = [self.minimise(theta, rng.integers(0, n, n)) for _ in range(replicates)]
        return np.array([r.x for r in results if r.success and np.isfinite(r.fun)]).reshape(-1, len(theta))

    def named(self, theta: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {}
        for term, s, p, center in zip(self.terms, *self._split(theta), self.centers, strict=True):
            out[term.scale_name] = float(np.exp(s + p * center))
            if term.exponent_name is not None:
                out[term.exponent_name] = float(p)
        return out

    def report(self, theta: np.ndarray, replicates: int, seed: int) -> dict[str, Any]:
        """Parameters, their bootstrap uncertainty and the in-sample errors."""
        predicted = np.exp(self.log_predict(theta))
        residual = np.log(predicted) - self.log_y
        samples = self.bootstrap(theta, replicates, seed)
        named_samples = [self.named(s) for s in samples]
        by_name = {name: np.array([s[name] for s in named_samples]) for name in self.named(theta)}
        uncertainty = {name: {"std": float(np.std(v)), "ci95": ci95(v)} for name, v in by_name.items() if len(v) >= 10}
        report: dict[str, Any] = {"parameters": self.named(theta), "uncertainty": uncertainty}
        report["bootstrap"] = {"replicates": replicates, "converged": len(samples)}
        report.update(huber_mean=float(huber(residual).mean()), huber_total=float(huber(residual).sum()))
        report.update(mape_percent=mape(predicted, np.exp(self.log_y)), points=len(self.log_y))
        exponents = zip(self.terms, self._split(theta)[1], strict=True)
        at_bound = [t.exponent_name for t, p in exponents if t.exponent_name and (p < 1e-4 or p > MAX_EXPONENT - 1e-4)]
        if at_bound:
            bound = f"at a bound (0 or {MAX_EXPONENT:g})"
            report["warning"] = f"exponent(s) {', '.join(at_bound)} {bound}: these data do not identify that term."
        return report
