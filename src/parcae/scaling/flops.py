"""Training FLOPs per token (README § Scaling laws, paper App. D) and the official formula. The counts follow our
code (the meta-device model's matmul weights), so tests check them against `torch.utils.flop_counter`."""

from __future__ import annotations

import math
from dataclasses import asdict, astuple, dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy import special
from torch import nn

from ..model.config import ParcaeConfig
from ..model.parcae import Parcae

# Attention FLOPs of one forward pass, per token, layer, query head-dimension and key: QKᵀ and AV, 2 each.
_ATTENTION_FWD = 4


@dataclass(frozen=True)
class MatmulParams:
    """Matmul parameters per token, grouped by how often they run in one training forward."""

    outer: int  # prelude + coda blocks (attention, MLP, value-embedding gates)
    head: int  # LM head (tied or not)
    readout: int = 0  # C, after the loop
    injection_once: int = 0  # loop-invariant injection matmul: B (diagonal), W_e (linear)
    core: int = 0  # one iteration of the core blocks
    injection_step: int = 0  # per-iteration injection matmul: W_h (linear)


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs per token and their parts (see the module docstring for the convention)."""

    seq_len: int
    causal: bool
    no_grad_iterations: float  # E[n] (or the given n)
    grad_iterations: float  # E[k] (or the given k)
    params_no_grad: float  # N̂₁
    params_grad: float  # N̂₂
    attention: float  # attention FLOPs per token (forward and backward)

    @property
    def total(self) -> float:
        return 2.0 * self.params_no_grad + 6.0 * self.params_grad + self.attention

    def to_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "total": self.total}


@lru_cache(maxsize=64)
def _meta_model(cfg: ParcaeConfig) -> Parcae:
    with torch.device("meta"):
        return Parcae(cfg)


def _linear_params(modules: list[nn.Module]) -> int:
    return sum(m.weight.numel() for module in modules for m in module.modules() if isinstance(m, nn.Linear))


def matmul_params(cfg: ParcaeConfig) -> MatmulParams:
    """Matmul parameters of `cfg`, read off the model built on the meta device (so they follow the code)."""
    model = _meta_model(cfg)
    outer, head = _linear_params([*model.prelude, *model.coda]), model.lm_head.weight.numel()
    if not cfg.is_looped:
        return MatmulParams(outer, head)
    injection_once = cfg.d_state * cfg.d_model if cfg.injection in ("diagonal", "diagonal-zoh", "linear") else 0
    injection_step = cfg.d_state * cfg.d_state if cfg.injection == "linear" else 0
    core = _linear_params(list(model.core))
    return MatmulParams(outer, head, model.readout.weight.numel(), injection_once, core, injection_step)


def core_params(cfg: ParcaeConfig) -> int:
    """All parameters of the core blocks (norms included): the official `N_core`."""
    return sum(p.numel() for block in _meta_model(cfg).core for p in block.parameters()) if cfg.is_looped else 0


def effective_params(cfg: ParcaeConfig, mean_recurrence: int | None = None) -> int:
    """N(μ_rec): parameters with the loop unrolled μ_rec times; as the official code, only the core blocks repeat."""
    mean = cfg.mean_recurrence if mean_recurrence is None else mean_recurrence
    total = sum(p.numel() for p in _meta_model(cfg).parameters())
    return total + (mean - 1) * core_params(cfg) if cfg.is_looped else total


def expected_iterations(cfg: ParcaeConfig, seq_len: int | None = None) -> tuple[float, float]:
    """(E[n], E[k]): expected core iterations per row without / with grad. T = max(1, Poisson(μ)), k = min(T, b),
    n = T − k, b = μ_bwd: E[k] = Σ_{j=1..b} P(T ≥ j), E[n] = E[T] − E[k], E[T] = μ + e^{−μ}. Per-token sampling runs
    the max of L token draws, P(T_max ≥ j) = 1 − P(T ≤ j−1)^L; fixed sampling runs μ, the last min(μ, b) with grad."""
    if not cfg.is_looped:
        return 0.0, 0.0
    mean, bwd = cfg.mean_recurrence, cfg.backprop_depth
    if cfg.depth_sampling == "fixed":
        return float(mean - min(mean, bwd)), float(min(mean, bwd))
    draws = (seq_len or cfg.max_seq_len) if cfg.depth_sampling == "per-token" else 1
    # Summed far enough into the tail that the remaining terms are below double precision.
    last = int(mean + 20 * math.sqrt(mean) + 40)
    while True:
        j = np.arange(1, last + 1)
        survival = np.where(j >= 2, special.pdtrc(j - 1, mean), 1.0)  # P(T ≥ j) = P(Poisson > j − 1), one draw
        with np.errstate(divide="ignore"):  # log1p(−1) = −∞ at j = 1 is intended: P(max ≥ 1) = 1
            at_least = -np.expm1(draws * np.log1p(-survival))  # P(max of `draws` ≥ j)
        if at_least[-1] < 1e-18:
            break
        last *= 2
    expected_total = float(mean + math.exp(-mean)) if draws == 1 else float(at_least.sum())
    expected_grad = float(at_least[:bwd].sum())
    return expected_total - expected_grad, expected_grad


def flops_per_token(
    cfg: ParcaeConfig,
    seq_len: int | None = None,
    *,
    no_grad: float | None = None,
    grad: float | None = None,
    causal: bool = False,
) -> FlopCount:
    """FLOPs per token at `seq_len` (default: context), with expected core iterations unless `no_grad`, `grad` given."""
    seq_len = seq_len or cfg.max_seq_len
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}.")
    if (no_grad is None) != (grad is None):
        raise ValueError("give both no_grad and grad iteration counts, or neither.")
    if no_grad is None or grad is None:
        no_grad, grad = expected_iterations(cfg, seq_len)
    elif not cfg.is_looped and (no_grad or grad):
        raise ValueError("a fixed-depth Transformer (n_core = 0) has no loop iterations.")
    params = matmul_params(cfg)
    once = params.outer + params.head + params.readout + params.injection_once
    per_iteration = params.core + params.injection_step
    keys = (seq_len + 1) / 2 if causal else seq_len
    outer_layer = _ATTENTION_FWD * cfg.n_heads * cfg.head_dim * keys
    core_layer = _ATTENTION_FWD * cfg.core_heads * cfg.head_dim * keys if cfg.is_looped else 0.0
    attention = 3 * (cfg.n_prelude + cfg.n_coda) * outer_layer + (no_grad + 3 * grad) * cfg.n_core * core_layer
    return FlopCount(seq_len, causal, no_grad, grad, no_grad * per_iteration, once + grad * per_iteration, attention)


def official_flops_per_token(cfg: ParcaeConfig, seq_len: int | None = None) -> int:
    """Official cost.py: 6·N_noncore + 3·(n_pre + n_coda)·4·d·L + (2R + 4S)·N_core + (R + 2S)·n_core·4·d_core·L with
    R = μ_rec, S = μ_bwd, N_core = core-block parameters, N_noncore = all parameters − embedding − N_core."""
    seq_len = seq_len or cfg.max_seq_len
    n_core = core_params(cfg)
    noncore = effective_params(cfg, 1) - cfg.vocab_size * cfg.d_model - n_core  # N(1): every parameter once
    outer = 3 * (cfg.n_prelude + cfg.n_coda) * _ATTENTION_FWD * cfg.n_heads * cfg.head_dim * seq_len
    r, s = cfg.mean_recurrence, cfg.backprop_depth
    core_attention = (r + 2 * s) * cfg.n_core * _ATTENTION_FWD * cfg.core_heads * cfg.head_dim * seq_len
    return 6 * noncore + outer + (2 * r + 4 * s) * n_core + core_attention


def format_breakdown(cfg: ParcaeConfig, count: FlopCount) -> str:
    """A human-readable table of `count` (from `flops_per_token(cfg, …)`)."""
    attention = "causal" if count.causal else "full"
    lines = [f"{cfg.name}: training FLOPs per token at L = {count.seq_len} ({attention} attention, model FLOPs)"]
    if cfg.is_looped:
        lines.append(
            f"  depth sampler {cfg.depth_sampling}, μ_rec {cfg.mean_recurrence}, μ_bwd {cfg.backprop_depth}: "
            f"E[n] = {count.no_grad_iterations:.4f} (no grad), E[k] = {count.grad_iterations:.4f} (grad)"
        )
    labels = ("prelude + coda matmuls", "LM head", "readout C", "injection, once per forward")
    labels += ("core matmuls per iteration", "injection per iteration")  # MatmulParams' fields, in order
    for index, (label, value) in enumerate(zip(labels, astuple(matmul_params(cfg)), strict=True)):
        if value or index < 2:  # the prelude + coda and the LM head are always listed
            lines.append(f"  {label:<30} {value:>16,}")
    lines += [
        f"  N̂₁ (no grad, ×2)               {count.params_no_grad:>16,.1f}",
        f"  N̂₂ (grad, ×6)                  {count.params_grad:>16,.1f}",
        f"  attention                      {count.attention:>16,.1f}",
        f"  total                          {count.total:>16,.1f}",
        f"  official formula (cost.py)     {official_flops_per_token(cfg, count.seq_len):>16,}",
    ]
    return "\n".join(lines)
