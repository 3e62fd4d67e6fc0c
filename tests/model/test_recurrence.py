import math

import pytest
import torch

from parcae import DepthPlan, DepthSampler, ParcaeConfig
from parcae.model.recurrence import LoopInputs, mix_seed, run_loop


def config(**overrides) -> ParcaeConfig:
    base = dict(vocab_size=64, d_model=64, n_heads=2, n_prelude=1, n_core=1, n_coda=1, mean_recurrence=8)
    return ParcaeConfig(**{**base, **overrides})


def test_poisson_truncated_sampler_statistics() -> None:
    sampler = DepthSampler(config(), seed=1)
    plan = sampler.sample(20_000, 4, step=0)
    total = plan.total.double()
    expected_mean = 8 + math.exp(-8)  # max(1, Poisson(8))
    assert abs(total.mean().item() - expected_mean) < 4 * math.sqrt(8 / 20_000)
    assert abs(total.var().item() - 8) < 0.4
    assert int(plan.grad.max()) <= 4 and int(plan.total.min()) >= 1
    torch.testing.assert_close(plan.no_grad + plan.grad, plan.total)
    torch.testing.assert_close(plan.grad, plan.total.clamp(max=4))  # k = min(T, μ_bwd)


def test_sampler_is_reproducible_from_seed_step_rank() -> None:
    cfg = config()
    draw = lambda seed, step, rank, lockstep=False: DepthSampler(cfg, seed, rank, lockstep).sample(64, 4, step).total  # noqa: E731
    assert torch.equal(draw(0, 3, 0), draw(0, 3, 0))
    assert not torch.equal(draw(0, 3, 0), draw(0, 4, 0))
    assert not torch.equal(draw(0, 3, 0), draw(0, 3, 1))
    assert not torch.equal(draw(0, 3, 0), draw(1, 3, 0))
    assert torch.equal(draw(0, 3, 0, True), draw(0, 3, 5, True))


@pytest.mark.parametrize("mode", ["per-sequence", "per-batch", "per-token", "fixed"])
def test_sampling_modes(mode: str) -> None:
    plan = DepthSampler(config(depth_sampling=mode, mean_recurrence=6), seed=0).sample(8, 5, step=1)
    assert plan.per_token == (mode == "per-token")
    assert tuple(plan.total.shape) == ((8, 5) if mode == "per-token" else (8,))
    if mode in ("per-batch", "fixed"):
        assert len(set(plan.total.tolist())) == 1
    if mode == "fixed":
        assert plan.total.tolist() == [6] * 8 and plan.grad.tolist() == [3] * 8


def test_mix_seed_spreads() -> None:
    seeds = {mix_seed(0, step, rank) for step in range(100) for rank in range(8)}
    assert len(seeds) == 800 and all(0 <= s < 2**63 for s in seeds)


def test_run_loop_counts_and_order() -> None:
    """A toy step (h ← h + 1) makes the executed iterations visible per row, in the original order."""
    h = torch.zeros(5, 2, 3)
    plan = DepthPlan.from_depths(torch.tensor([3, 7, 1, 4, 2]), 2)
    inputs = LoopInputs(x=h, cos=h, sin=h, value_embeds={}, drive=torch.ones(5, 2, 3))
    result = run_loop(lambda rows, given: rows + given.drive, h, plan, inputs)
    assert result.state[:, 0, 0].tolist() == [3, 7, 1, 4, 2]
    assert result.executed_passes == result.sampled_passes == 17
    torch.testing.assert_close(result.residual, torch.tensor(math.sqrt(3)))


def test_run_loop_per_token_freezes_tokens() -> None:
    h = torch.zeros(2, 3, 1)
    plan = DepthPlan.from_depths(torch.tensor([[1, 4, 2], [3, 3, 3]]), 2)
    result = run_loop(lambda rows, _: rows + 1, h, plan, LoopInputs(x=h, cos=h, sin=h, value_embeds={}))
    assert result.state[..., 0].tolist() == [[1, 4, 2], [3, 3, 3]]
    assert result.executed_passes == 4 + 3
