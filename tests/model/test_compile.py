"""The compiled training path (`Parcae.compile_loop`, `--set compile=true`): one compiled region per loop iteration
that computes what eager mode computes, never breaks its graph and does not recompile for new active-row counts.

Graph-level tests use dynamo with the `aot_eager` backend (autograd traced, no kernels generated: fast);
one test runs inductor, the backend training uses."""

import copy
import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from parcae import DepthPlan, Parcae
from parcae.model.parcae import Parcae as ParcaeClass
from test_model import VARIANTS, ids, randomise, small

# Compile time grows with the graphs: one core block, no prelude or coda, where the test is about the loop alone.
LOOP_ONLY = dict(n_prelude=0, n_core=1, n_coda=0)
# Total depths with a lone deepest row (the single-row path) and rows finishing at every iteration.
PLANS = ([5, 1, 3, 8], [2, 6, 6, 1], [4, 4, 2, 3])


def _pair(overrides: dict, backend) -> tuple[Parcae, Parcae]:
    torch._dynamo.reset()
    eager = randomise(Parcae(small(**overrides)))
    compiled = copy.deepcopy(eager)
    compiled.compile_loop(backend=backend)
    return eager, compiled


def _assert_same_step(eager: Parcae, compiled: Parcae, x: torch.Tensor, plan: DepthPlan) -> None:
    """Loss and every parameter's gradient of one training forward + backward agree."""
    losses = []
    for model in (eager, compiled):
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=x, depth_plan=plan, state_seed=1, return_logits=False).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("variant", ["add", "linear"])  # the RDM baselines; Parcae's diagonal injection: below
def test_compiled_loop_matches_eager_loss_and_gradients(variant: str) -> None:
    counter = CompileCounterWithBackend("aot_eager")
    eager, compiled = _pair({**VARIANTS[variant], **LOOP_ONLY}, counter)
    for depths in PLANS:  # all steps with gradient (backprop depth 8): the no-grad graph is tested below
        _assert_same_step(eager, compiled, ids(4, 12), DepthPlan.from_depths(torch.tensor(depths), 8))
    assert counter.frame_count == 4  # before and after the loop, the iteration at its first and later steps


def test_recompiles_bounded_over_random_depths() -> None:
    """30 freshly sampled depth plans (and a per-token one): every graph exists after the first step (prelude,
    coda, the iteration without grad, at its first grad step and at later grad steps), none is added later."""
    counter = CompileCounterWithBackend("aot_eager")
    eager, compiled = _pair(LOOP_ONLY, counter)
    x, frames = ids(8, 12), []
    for step in range(30):
        plan = eager.depth_sampler.sample(8, 12, step)
        if step < 3:
            _assert_same_step(eager, compiled, x, plan)
        else:
            compiled(x, labels=x, depth_plan=plan, return_logits=False).loss.backward()
        frames.append(counter.frame_count)
    _assert_same_step(eager, compiled, x, DepthPlan.from_depths(torch.randint(1, 6, (8, 12)), 2))
    frames.append(counter.frame_count)
    assert frames[0] <= 5, frames
    assert frames[-1] == frames[0], f"recompiled after warm-up: graphs after each step {frames}"


def test_compiled_model_in_eval_cached_inference_and_copies() -> None:
    """Eval runs the compiled regions, cached inference the eager methods; a copy's regions are its own."""
    eager, compiled = _pair({}, "eager")
    eager.eval(), compiled.eval()
    x = ids(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, eager(x).logits)
    cache, reference = compiled.new_cache(3, 12), eager.new_cache(3, 12)
    torch.testing.assert_close(compiled.forward_cached(x, cache).logits, eager.forward_cached(x, reference).logits)
    copied = copy.deepcopy(compiled)
    assert copied.step.__self__ is copied and copied.loop_inputs.__self__ is copied


@pytest.mark.parametrize("grad", [True, False])
def test_no_graph_break_in_compiled_regions(grad: bool) -> None:
    """fullgraph=True fails on any graph break: each region (the loop iteration above all) is one graph."""
    torch._dynamo.reset()
    model = randomise(Parcae(small()))
    x = ids(3, 12)
    with torch.set_grad_enabled(grad):
        inputs = torch.compile(ParcaeClass.loop_inputs, backend="eager", fullgraph=True)(model, x)
        h = torch.randn(3, 12, 64, requires_grad=grad)
        for rows in (h, inputs.drive, *inputs.core_embeds):  # the row dimension dynamic, as `compile_loop` marks it
            if rows is not None:
                torch._dynamo.mark_dynamic(rows, 0)
        counter = CompileCounter()
        step = torch.compile(ParcaeClass.step, backend=counter, fullgraph=True)
        y = step(model, h, inputs)
        step(model, y[:2], inputs.rows(slice(0, 2)))
        out = torch.compile(ParcaeClass.after_loop, backend="eager", fullgraph=True)(model, y, inputs)
    assert counter.frame_count == 1, "a new row count recompiled the iteration"
    assert out.shape == (3, 12, 64)


def test_inductor_compiled_iteration_matches_eager() -> None:
    """The backend training uses (C++ kernels on a CPU), on the loop iteration alone and without gradient to keep
    its compile time small: the gradients of the same graphs are checked above through AOT autograd, which
    inductor's backward also uses."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor's CPU kernels need a C++ compiler")
    counter = CompileCounterWithBackend("inductor")
    eager, compiled = _pair(LOOP_ONLY, counter)
    with torch.no_grad():
        inputs, h = eager.loop_inputs(ids(3, 8)), torch.randn(3, 8, 64)
        for rows in (3, 2, 1):  # a new row count, then a lone row
            sub = inputs.rows(slice(0, rows))
            torch.testing.assert_close(compiled.step(h[:rows], sub), eager.step(h[:rows], sub))
    assert counter.frame_count == 1
