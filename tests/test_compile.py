"""The compiled path (`--set compile=true`: each block under torch.compile) computes what eager mode computes."""

import copy

import pytest
import torch

from parcae import DepthPlan, Parcae
from test_model import ids, randomise, small


def _skip_unless_compile_works() -> None:
    """Inside the test, so that collecting the suite never pays for a compilation."""
    try:
        torch.compile(lambda t: t * 2 + 1, dynamic=True)(torch.ones(3))
    except Exception as err:  # any backend failure (no C++ compiler for inductor's CPU kernels, …): skip, say why
        pytest.skip(f"torch.compile does not work here ({type(err).__name__}: {str(err)[:200]})")


def test_compiled_blocks_match_eager_loss_and_gradients_across_depth_plans() -> None:
    _skip_unless_compile_works()
    torch.manual_seed(0)
    eager = randomise(Parcae(small()))
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    x = ids(4, 12)
    # Different plans change how many rows each compacted iteration carries: the dynamic batch dimension.
    plans = [DepthPlan.from_depths(torch.tensor([5, 1, 3, 8]), 2), DepthPlan.from_depths(torch.tensor([2, 6, 6, 1]), 2)]
    for plan in plans:
        losses = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss = model(x, labels=x, depth_plan=plan, state_seed=1, return_logits=False).loss
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
