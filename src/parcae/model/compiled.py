"""Training under `torch.compile`: the regions of `Parcae` (methods `compile_loop` and `compile_blocks`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .recurrence import LoopInputs

# `Parcae` is typed as a module here: importing its class would close a cycle (it binds these functions).
Parcae = torch.nn.Module


def compile_loop(self: Parcae, backend: Any = "inductor", recompile_limit: int = 64) -> None:
    """Compile for training (`--set compile=true`): regions `step`, before and after the loop; the loop, sampling, head
    and caches stay eager (as the official loop). Rows are dynamic: nothing recompiles after warm-up."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    eager = {name: getattr(type(self), name) for name in ("loop_inputs", "step", "after_loop")}
    compiled = {name: torch.compile(method, backend=backend) for name, method in eager.items()}

    def loop_inputs(model: Parcae, input_ids: Tensor, *, positions: int | Tensor = 0, cache=None) -> LoopInputs:
        if cache is not None or isinstance(positions, Tensor) or positions:
            return eager["loop_inputs"](model, input_ids, positions=positions, cache=cache)
        return compiled["loop_inputs"](model, input_ids)

    def step(model: Parcae, h: Tensor, inputs: LoopInputs, *, cache=None, **kwargs: Any) -> Tensor:
        if cache is not None:
            return eager["step"](model, h, inputs, cache=cache, **kwargs)
        if h.shape[0] == 1:  # run twice: compilers specialise size 1 (a graph of its own); rows are independent
            twice = torch.zeros(2, dtype=torch.long, device=h.device)
            with torch.enable_grad():  # requires_grad and views as the loop's slices have: graphs guard on both
                h, inputs = h.index_select(0, twice)[:2], inputs.rows(twice).rows(slice(0, 2))
            return step(model, h, inputs)[:1]
        for rows in (h, inputs.drive, *inputs.core_embeds):
            if rows is not None:
                torch._dynamo.mark_dynamic(rows, 0)
        return compiled["step"](model, h, inputs)

    def after_loop(model: Parcae, h: Tensor, inputs: LoopInputs, *, cache=None, last_only: bool = False) -> Tensor:
        if cache is not None or last_only:
            return eager["after_loop"](model, h, inputs, cache=cache, last_only=last_only)
        return compiled["after_loop"](model, h, inputs)

    for region in (loop_inputs, step, after_loop):  # bound methods: a deepcopy rebinds them to the copy
        setattr(self, region.__name__, region.__get__(self))


def compile_blocks(self: Parcae, recompile_limit: int = 64) -> None:
    """Each block under `torch.compile(dynamic=True)`; their shared recompile limit is raised (torch 8, official 64)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    for block in self.blocks():
        block.compile(dynamic=True)
