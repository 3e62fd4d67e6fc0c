"""FLOP accounting: a hand-computed config, exact sampler moments, the official formula, FlopCounterMode."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from parcae import DepthPlan, DepthSampler, Parcae, ParcaeConfig, count_params, get_preset
from parcae.cli import main
from parcae.scaling.flops import (
    core_params,
    effective_params,
    expected_iterations,
    flops_per_token,
    official_flops_per_token,
)


def test_hand_computed_tiny_config() -> None:
    d, heads, mlp, vocab, seq = 32, 2, 64, 64, 16
    cfg = ParcaeConfig(
        vocab_size=vocab, d_model=d, n_heads=heads, d_mlp=mlp, n_prelude=1, n_core=1, n_coda=1, max_seq_len=seq,
        mean_recurrence=3, backprop_depth=2, depth_sampling="fixed", value_embeddings=False,
    )  # fmt: skip
    block = 4 * d * d + 2 * d * mlp  # q, k, v, out + MLP up/down
    n, k = 1, 2  # fixed depth 3, the last 2 with gradient
    once = 2 * block + vocab * d + d * d + d * d  # prelude + coda, head (tied), readout C, B (once per forward)
    attention_layer = 4 * d * seq  # QKᵀ + AV, full L×L, forward
    expected = 2 * (n * block) + 6 * (once + k * block) + 3 * 2 * attention_layer + (n + 3 * k) * attention_layer
    count = flops_per_token(cfg)
    assert (count.no_grad_iterations, count.grad_iterations) == (n, k)
    assert count.total == expected
    # Causal counting sees (L + 1) / 2 keys per query instead of L.
    causal = flops_per_token(cfg, causal=True)
    assert causal.attention == pytest.approx(count.attention * (seq + 1) / 2 / seq)
    # Value embeddings add only their gates' matmuls (32 → kv heads); the table lookups are free.
    with_ve = flops_per_token(cfg.replace(value_embeddings=True))
    gates_outer = sum(cfg.replace(value_embeddings=True).has_value_embedding(i) for i in (0, 2))
    gates_core = int(cfg.replace(value_embeddings=True).has_value_embedding(1))
    assert with_ve.total - count.total == 32 * heads * (6 * gates_outer + (2 * n + 6 * k) * gates_core)


def test_linear_injection_state_block_runs_every_iteration() -> None:
    base = get_preset("rdm-linear-tiny", depth_sampling="fixed", mean_recurrence=5, backprop_depth=2)
    diagonal = base.replace(injection="diagonal")
    s = base.d_state
    difference = flops_per_token(base).total - flops_per_token(diagonal).total
    assert difference == 2 * 3 * s * s + 6 * 2 * s * s  # W_h: 3 iterations without, 2 with gradient


def _poisson_moments(mean: int, bwd: int) -> tuple[float, float]:
    """E[n], E[k] by direct summation over T = max(1, Poisson(μ)) (an independent check of the closed form)."""
    support = range(0, mean * 10 + 60)
    probs = [math.exp(t * math.log(mean) - mean - math.lgamma(t + 1)) for t in support]
    depths = [max(1, t) for t in support]
    grad = sum(p * min(t, bwd) for p, t in zip(probs, depths, strict=True))
    total = sum(p * t for p, t in zip(probs, depths, strict=True))
    return total - grad, grad


@pytest.mark.parametrize(("mean", "bwd"), [(1, 1), (2, 1), (4, 2), (8, 4), (12, 6), (8, 8)])
def test_expected_iterations_are_exact(mean: int, bwd: int) -> None:
    cfg = get_preset("parcae-micro", mean_recurrence=mean, backprop_depth=bwd)
    no_grad, grad = expected_iterations(cfg)
    want_no_grad, want_grad = _poisson_moments(mean, bwd)
    assert no_grad == pytest.approx(want_no_grad, abs=1e-12)
    assert grad == pytest.approx(want_grad, abs=1e-12)
    assert no_grad + grad == pytest.approx(mean + math.exp(-mean), abs=1e-12)


@pytest.mark.parametrize("mode", ["per-sequence", "per-token"])
def test_expected_iterations_match_the_sampler(mode: str) -> None:
    cfg = get_preset("parcae-micro", depth_sampling=mode, max_seq_len=16)
    sampler = DepthSampler(cfg, seed=3)
    no_grad, grad = [], []
    for step in range(1500):
        plan = sampler.sample(8, 16, step=step)
        rows_n = plan.no_grad.amax(1) if plan.per_token else plan.no_grad  # the loop runs a row's largest depth
        rows_k = plan.grad.amax(1) if plan.per_token else plan.grad
        no_grad.append(rows_n.double().mean())
        grad.append(rows_k.double().mean())
    want_n, want_k = expected_iterations(cfg, 16)
    n, k = torch.stack(no_grad), torch.stack(grad)
    assert abs(float(n.mean()) - want_n) < 4 * float(n.std()) / math.sqrt(len(n)) + 1e-9
    assert abs(float(k.mean()) - want_k) < 4 * float(k.std()) / math.sqrt(len(k)) + 1e-9
    if mode == "per-token":
        assert want_n > expected_iterations(cfg.replace(depth_sampling="per-sequence"))[0] + 1


def test_official_formula_reproduces_the_documented_figures() -> None:
    # What the official scripts/cost.py gives at 2048 tokens, μ_rec 8 / μ_bwd 4 (docs/official-format.md).
    assert official_flops_per_token(get_preset("parcae-140m")) == 1_359_902_976
    assert official_flops_per_token(get_preset("gpt-140m")) == 821_098_368
    assert core_params(get_preset("parcae-140m")) == 14_159_040


def test_effective_params_unroll_the_core() -> None:
    cfg = get_preset("parcae-micro")
    assert effective_params(cfg, 1) == count_params(cfg)
    assert effective_params(cfg, 5) - effective_params(cfg, 4) == core_params(cfg) > 0
    assert effective_params(get_preset("gpt-tiny")) == count_params(get_preset("gpt-tiny"))


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # diagonal injection, tied head, value embeddings
        {"injection": "linear", "n_kv_heads": 1, "tie_embeddings": False, "mlp": "swiglu", "d_state": 128},
        {"n_core": 0, "n_prelude": 2},  # the fixed-depth Transformer
    ],
)
def test_flop_counter_agrees_on_a_real_forward_backward(overrides: dict) -> None:
    cfg = get_preset("parcae-micro", max_seq_len=32, **overrides)
    model = Parcae(cfg).train()
    batch, seq, depth, grad_steps = 2, 32, 3, 2
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    plan = DepthPlan.fixed(batch, depth, grad_steps) if cfg.is_looped else None
    # FlopCounterMode counts no FLOPs for CPU's fused SDPA kernel; the math backend's matmuls it counts
    # (full L×L scores even with is_causal, 2 forward + 4 backward bmm: the paper's 3× convention).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, labels=ids, depth_plan=plan).loss.backward()
    measured = counter.get_total_flops() / (batch * seq)
    n, k = (depth - grad_steps, grad_steps) if cfg.is_looped else (0, 0)
    predicted = flops_per_token(cfg, seq, no_grad=n, grad=k).total
    assert measured == pytest.approx(predicted, rel=0.05)


def test_flops_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--preset", "parcae-140m"]) == 0
    out = capsys.readouterr().out
    assert "1,359,902,976" in out and "E[n] =" in out
    assert main(["flops", "--preset", "parcae-micro", "--set", "lr=1e-3"]) == 2
    assert "training fields" in capsys.readouterr().err
