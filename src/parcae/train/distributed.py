"""Distributed training under torchrun (docs/distributed.md); without it every collective is the identity. Rank 0
alone writes checkpoints, in the single-process format (FSDP gathers to it), so a run resumes at any world size."""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from ..data.packing import BestFitPacker
from ..device import resolve_device
from ..eval.loss import DepthResult
from ..model.head import IGNORE_INDEX
from ..model.parcae import Parcae
from .checkpoint import CheckpointError, CheckpointManager, Snapshot
from .config import PARALLEL_MODES
from .optim import MuonAdamW

T = TypeVar("T")


class DistributedContext:
    """This process's place in the run and the trainer's collectives; `enabled`: a process group exists (even of 1)."""

    def __init__(
        self, rank: int, world_size: int, device: torch.device, parallel: str, owns_group: bool, enabled: bool = True
    ) -> None:
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"unknown parallel mode {parallel!r}; choose one of {', '.join(PARALLEL_MODES)}.")
        self.rank, self.world_size, self.device, self.parallel = rank, world_size, device, parallel
        self._owns_group, self.enabled = owns_group, enabled
        self.is_main, self.sharded = rank == 0, enabled and parallel == "fsdp"

    @classmethod
    def from_environment(cls, device: str = "auto", parallel: str = "ddp") -> DistributedContext:
        """Join torchrun's process group (or the caller's), even of one process (the N-process code); else run alone."""
        joined = tdist.is_available() and tdist.is_initialized()
        if not joined and ("WORLD_SIZE" not in os.environ or "RANK" not in os.environ):
            return cls(0, 1, resolve_device(device), "ddp", owns_group=False, enabled=False)
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        if not joined:
            cuda = dev.type == "cuda"
            if cuda:
                torch.cuda.set_device(dev)  # object collectives on NCCL use the current device
            tdist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
        return cls(tdist.get_rank(), tdist.get_world_size(), dev, parallel, owns_group=not joined)

    def close(self) -> None:
        """Leave the process group if we joined it (after the trainer dropped its DDP wrapper)."""
        if self._owns_group and tdist.is_initialized():
            gc.collect()  # wrappers caught in reference cycles must not outlive the group either
            tdist.destroy_process_group()
        self._owns_group = False

    def on_main(self, fn: Callable[[], T], *, share: bool = True) -> T:
        """`fn()` on rank 0, its result (`share=False`: None) and any exception to every rank, so none waits forever."""
        if not self.enabled:
            return fn()
        result: Any = None
        error: Exception | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:
                error = err
        box: list[Any] = [(None if error is None else _portable(error), result if share else None)]
        tdist.broadcast_object_list(box, src=0)
        remote_error, shared = box[0]
        if remote_error is not None:
            raise error or remote_error  # rank 0 its own exception, the others its copy
        return result if self.is_main else shared

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        tdist.all_gather_object(gathered, obj)
        return gathered

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Element-wise sum (or max) of `values` over the ranks, in float64."""
        if not self.enabled:
            return list(values)
        device = self.device if tdist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
        return tensor.tolist()

    def wrap(self, model: Parcae) -> nn.Module:
        """What the training forward calls: the DDP wrapper, or the model sharded in place by FSDP2."""
        if not self.enabled:
            return model
        if self.parallel == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # The core runs T times a forward: its blocks stay gathered for the step (one all-gather, not one per pass).
        core = {id(block) for block in model.core} if model.config.is_looped else set()
        for block in model.blocks():
            fully_shard(block, mesh=mesh, reshard_after_forward=id(block) not in core)
        fully_shard(model, mesh=mesh)
        return model

    def gradient_sync(self, engine: nn.Module, enabled: bool) -> AbstractContextManager:
        """Around a micro-batch's forward + backward: reduce gradients only on the last micro-batch of a step."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(engine, nn.parallel.DistributedDataParallel) and not enabled:
            return engine.no_sync()
        if isinstance(engine, FSDPModule):
            engine.set_requires_gradient_sync(enabled)
        return nullcontext()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip to a global norm; with FSDP the norm of the sharded gradients is reduced over the ranks."""
        from torch.distributed.tensor import DTensor

        if not any(isinstance(p.grad, DTensor) for p in params):
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    @contextmanager
    def full_parameters(self, module: nn.Module) -> Iterator[None]:
        """Gather an FSDP module's own parameters (outside a forward it holds shards); every rank must enter."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(module, FSDPModule):
            yield
            return
        module.unshard()
        try:
            yield
        finally:
            module.reshard()

    def shard_batches(self, batches: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Every world_size-th batch, topped up with fully ignored copies: FSDP needs equally many forwards per rank."""
        if not batches or not self.enabled:
            return batches
        mine = batches[self.rank :: self.world_size]
        filler = (batches[0][0], torch.full_like(batches[0][1], IGNORE_INDEX))
        return mine + [filler] * (math.ceil(len(batches) / self.world_size) - len(mine))

    def reduce_depth_results(self, results: list[DepthResult]) -> list[DepthResult]:
        """Token-weighted means over every rank's share of the validation batches."""
        if not self.enabled:
            return results
        weighted = [(r.loss, r.tokens, r.state_norm or 0.0, r.residual or 0.0) for r in results]
        sums = self.all_reduce([x for loss, n, norm, res in weighted for x in (loss * n, n, norm * n, res * n)])
        reduced = []
        for i, r in enumerate(results):
            nats, tokens, norm, residual = sums[4 * i : 4 * i + 4]
            n = max(tokens, 1.0)
            means = {"state_norm": norm / n, "residual": residual / n} if r.state_norm is not None else {}
            reduced.append(dataclasses.replace(r, loss=nats / n, tokens=int(tokens), **means))
        return reduced

    def save_checkpoint(
        self, manager: CheckpointManager, step: int, model: Parcae, optimizer: MuonAdamW, state: dict[str, Any]
    ) -> Path:
        """Rank 0 writes the checkpoint (the single-process format); every rank gets its path (or the error)."""
        if not self.sharded:  # DDP replicas are whole: rank 0's model and optimiser are the checkpoint
            return self.on_main(lambda: manager.save(step, model, optimizer, state))
        from torch.distributed.checkpoint import state_dict as dcp

        options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0's memory
        weights = dcp.get_model_state_dict(model, options=options)
        # An optimiser that never stepped has no state (DCP would create it by a zero-lr step: Adam's count +1).
        gathered = dcp.get_optimizer_state_dict(model, optimizer, options=options) if optimizer.state else {}
        groups = optimizer.state_dict()["param_groups"]

        def write() -> Path:
            index = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
            by_index = {index[name]: value for name, value in gathered.get("state", {}).items()}
            full = {"state": by_index, "param_groups": groups}
            return manager.save(step, _cpu_model(model.config, weights), full, state)

        return self.on_main(write)

    def load_checkpoint(
        self, manager: CheckpointManager, path: Path, model: Parcae, optimizer: MuonAdamW
    ) -> dict[str, Any]:
        """Restore model and optimiser on all ranks (rank 0 reads; DCP broadcasts, shards); return the trainer state."""
        if not self.enabled:
            return manager.load(path, model, optimizer)
        from torch.distributed.checkpoint import state_dict as dcp

        def read() -> tuple[dict[str, Tensor], Snapshot]:
            snapshot = manager.read(path)
            mine = [len(g["params"]) for g in optimizer.param_groups]
            theirs = [len(g["params"]) for g in snapshot.optimizer["param_groups"]]
            if mine != theirs:  # the single-process check (`Optimizer.load_state_dict`), before any collective
                sizes = f"parameter groups of sizes {theirs}, expected {mine}"
                raise CheckpointError(f"checkpoint {path} does not match this optimizer: {sizes}")
            return _cpu_model(model.config, snapshot.weights).state_dict(), snapshot  # checked; tied head added

        weights, snapshot = self.on_main(read, share=False) or ({}, None)  # the others get ({}, None)
        saved = snapshot.optimizer if snapshot else {}
        state, groups, has_state = self.on_main(lambda: (snapshot.state, saved["param_groups"], bool(saved["state"])))
        options = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        dcp.set_model_state_dict(model, weights, options=options)
        if not has_state:  # a checkpoint taken before any update: restore the hyper-parameters, drop any state
            optimizer.load_state_dict({"state": {}, "param_groups": groups})
            return state
        names = parameter_names(model, optimizer)  # DCP keys the optimiser state by parameter name
        by_name = {
            "state": {names[int(i)]: value for i, value in saved.get("state", {}).items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in groups],
        }
        dcp.set_optimizer_state_dict(model, optimizer, by_name if snapshot else {}, options=options)
        return state


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling (to be raised on the other ranks), else a RuntimeError that says it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__} on rank 0: {error}")
    return error


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimiser's parameters, in `Optimizer.state_dict()` index order."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _cpu_model(config: Any, weights: dict[str, Tensor]) -> Parcae:
    """A CPU model holding full `weights`, so the distributed paths share the single-process checks and format."""
    with torch.device("meta"):
        model = Parcae(config)
    model.load_weights(weights, device="cpu")
    return model


class InterleavedPacker:
    """A W-rank run's micro-batches, rank by rank: with grad_accum × W one process computes its DDP gradient exactly."""

    def __init__(self, packers: Sequence[BestFitPacker]) -> None:
        self.packers = list(packers)
        self._turn = 0

    def next_batch(self) -> tuple[Tensor, Tensor]:
        packer = self.packers[self._turn]
        self._turn = (self._turn + 1) % len(self.packers)
        return packer.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"turn": self._turn, "packers": [p.state_dict() for p in self.packers]}
