"""Distributed training under torchrun: the process group, DDP / FSDP2, agreement between ranks, checkpoints.

`torchrun --nproc-per-node N -m parcae train … --parallel ddp|fsdp` starts N copies of the ordinary trainer;
torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address, and `DistributedContext.from_environment`
joins the group (NCCL when training on CUDA, gloo on the CPU). Without torchrun there is no group and every
method here is the identity, so a plain `parcae train` runs exactly as it always did.

What each rank does:
- Data: its own documents — document i belongs to rank i % world_size (`BestFitPacker`), a true partition —
  so the global batch is batch_size × grad_accum × world_size rows and no document is read twice.
- Model: DDP replicates it and all-reduces gradients; every parameter gets a gradient every step, so
  `find_unused_parameters` stays off. FSDP2 shards each block and then the root (`fully_shard`), and
  `ShardedMuonAdamW` gives Muon the whole matrices it needs.
- Agreement: one all-reduce per step carries the loss (so every rank logs the same number) and the
  non-finite flag (so all ranks skip a step together); another carries the step time and a stop request (so
  all ranks agree on a time budget and on Ctrl-C / SIGTERM). Validation is sharded (rank r evaluates batches
  r, r + W, …) and its token-weighted sums are all-reduced: the figure equals the single-process one.
- Files: rank 0 alone writes metrics, summaries and checkpoints. Checkpoints are the single-process format
  (FSDP gathers the full state to rank 0 with `torch.distributed.checkpoint.state_dict`), so a run resumes at
  any world size; see `restore_packer` for where the data stream then continues.
"""

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

from ..data.packing import BestFitPacker, rank_documents
from ..device import resolve_device
from ..eval.loss import DepthResult
from ..model.parcae import IGNORE_INDEX, Parcae
from .checkpoint import CheckpointError, CheckpointManager, Snapshot
from .config import PARALLEL_MODES
from .optim import MuonAdamW, OptimizerSettings, build_optimizer, orthogonalize

T = TypeVar("T")
Batch = tuple[Tensor, Tensor]


class DistributedContext:
    """This process's place in the run (rank, world size, device) and the collectives the trainer needs."""

    def __init__(self, rank: int, world_size: int, device: torch.device, parallel: str, owns_group: bool) -> None:
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"unknown parallel mode {parallel!r}; choose one of {', '.join(PARALLEL_MODES)}.")
        self.rank, self.world_size, self.device, self.parallel = rank, world_size, device, parallel
        self._owns_group = owns_group

    @classmethod
    def from_environment(cls, device: str = "auto", parallel: str = "ddp") -> DistributedContext:
        """Join the process group torchrun describes (or reuse one the caller made); else a single process.

        A group is used whenever one exists or torchrun launched us — even with one process, so that
        `torchrun --nproc-per-node 1` runs the same code as N processes.
        """
        if tdist.is_available() and tdist.is_initialized():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            dev = resolve_device(device, local_rank)
            return cls(tdist.get_rank(), tdist.get_world_size(), dev, parallel, owns_group=False)
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            return SingleProcess(resolve_device(device))
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.set_device(dev)  # object collectives on NCCL use the current device
        tdist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
        return cls(tdist.get_rank(), tdist.get_world_size(), dev, parallel, owns_group=True)

    # ------------------------------------------------------------------ who we are
    @property
    def enabled(self) -> bool:
        """True when there is a process group (even of one)."""
        return True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.enabled and self.parallel == "fsdp"

    def close(self) -> None:
        """Leave the process group if we joined it (after the trainer dropped its DDP wrapper)."""
        if self._owns_group and tdist.is_initialized():
            gc.collect()  # wrappers caught in reference cycles must not outlive the group either
            tdist.destroy_process_group()
        self._owns_group = False

    # ------------------------------------------------------------------ collectives
    def on_main(self, fn: Callable[[], T], *, share: bool = True) -> T:
        """`fn()` on rank 0 only, its result handed to every rank (`share=False`: rank 0 keeps it, the others
        get None). An exception there is raised on every rank — same type, same message — so a user error
        stays one line and no rank waits forever for one that failed."""
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
        if error is not None:
            raise error
        if remote_error is not None:
            raise remote_error
        return result if self.is_main else shared

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        tdist.all_gather_object(gathered, obj)
        return gathered

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Element-wise sum (or max) of `values` over the ranks, in float64."""
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
        return tensor.tolist()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if tdist.get_backend() == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ the model
    def wrap(self, model: Parcae) -> nn.Module:
        """What the training forward calls: the DDP wrapper, or the model sharded in place by FSDP2."""
        if self.parallel == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # The core runs T times per forward: keep its blocks gathered for the whole step (one all-gather
        # instead of one per iteration); the other blocks are resharded after their forward as usual.
        core = {id(block) for block in model.core} if model.config.is_looped else set()
        for block in model.blocks():
            fully_shard(block, mesh=mesh, reshard_after_forward=id(block) not in core)
        fully_shard(model, mesh=mesh)
        return model

    def build_optimizer(self, model: nn.Module, settings: OptimizerSettings) -> MuonAdamW:
        """The paper's optimiser over `model`'s parameters (after `wrap`: FSDP's are sharded DTensors)."""
        optimizer = build_optimizer(model, settings)
        return ShardedMuonAdamW(optimizer.param_groups) if self.sharded else optimizer

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
        """Outside a forward, FSDP holds only shards: gather the module's own parameters for the block
        (a collective — every rank must enter it)."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(module, FSDPModule):
            yield
            return
        module.unshard()
        try:
            yield
        finally:
            module.reshard()

    # ------------------------------------------------------------------ validation
    def shard_batches(self, batches: list[Batch]) -> list[Batch]:
        """This rank's validation batches: every world_size-th one, topped up with copies whose labels are all
        ignored, so every rank runs equally many forwards (FSDP's collectives need that); they count for nothing."""
        if not batches:
            return batches
        mine = batches[self.rank :: self.world_size]
        filler = (batches[0][0], torch.full_like(batches[0][1], IGNORE_INDEX))
        return mine + [filler] * (math.ceil(len(batches) / self.world_size) - len(mine))

    def reduce_depth_results(self, results: list[DepthResult]) -> list[DepthResult]:
        """Token-weighted means over every rank's share of the validation batches."""
        weighted = [(r.loss, r.tokens, r.state_norm or 0.0, r.residual or 0.0) for r in results]
        sums = self.all_reduce([x for loss, n, norm, res in weighted for x in (loss * n, n, norm * n, res * n)])
        reduced = []
        for i, r in enumerate(results):
            nats, tokens, norm, residual = sums[4 * i : 4 * i + 4]
            n = max(tokens, 1.0)
            looped = r.state_norm is not None
            means = {"state_norm": norm / n, "residual": residual / n} if looped else {}
            reduced.append(dataclasses.replace(r, loss=nats / n, tokens=int(tokens), **means))
        return reduced

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self, manager: CheckpointManager, step: int, model: Parcae, optimizer: MuonAdamW, state: dict[str, Any]
    ) -> Path:
        """Rank 0 writes the checkpoint (the single-process format); every rank gets its path (or the error)."""
        if not self.sharded:  # DDP replicas are whole: rank 0's model and optimiser are the checkpoint
            return self.on_main(lambda: manager.save(step, model, optimizer, state))
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0's memory
        weights = get_model_state_dict(model, options=options)
        # An optimiser that never stepped has no state (DCP would create it by a zero-lr step: Adam's count +1).
        gathered = get_optimizer_state_dict(model, optimizer, options=options) if optimizer.state else {}
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
        """Restore model and optimiser from checkpoint `path` on every rank; returns the trainer state.

        Rank 0 alone reads and verifies the files; the tensors are broadcast (and sharded, with FSDP) by
        `torch.distributed.checkpoint.state_dict`, so no rank but rank 0 holds the full state in memory.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        def read() -> tuple[dict[str, Tensor], Snapshot]:
            snapshot = manager.read(path)
            _check_optimizer_groups(snapshot.optimizer, optimizer, path)
            return _cpu_model(model.config, snapshot.weights).state_dict(), snapshot  # checked; tied head added

        weights, snapshot = self.on_main(read, share=False) or ({}, None)  # the others get ({}, None)
        summary = (
            (snapshot.state, snapshot.optimizer["param_groups"], bool(snapshot.optimizer["state"]))
            if snapshot
            else None
        )
        state, groups, has_state = self.broadcast(summary)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, weights, options=options)
        if not has_state:  # a checkpoint taken before any update: restore the hyper-parameters, drop any state
            optimizer.load_state_dict({"state": {}, "param_groups": groups})
            return state
        by_name = {}
        if snapshot is not None:  # DCP keys the optimiser state by parameter name
            names = parameter_names(model, optimizer)
            by_name = {
                "state": {names[int(i)]: value for i, value in snapshot.optimizer["state"].items()},
                "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in groups],
            }
        set_optimizer_state_dict(model, optimizer, by_name, options=options)
        return state


class SingleProcess(DistributedContext):
    """One process, no group: every collective is the identity and the trainer runs as it always did."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(0, 1, device, "ddp", owns_group=False)

    @property
    def enabled(self) -> bool:
        return False

    def on_main(self, fn: Callable[[], T], *, share: bool = True) -> T:
        return fn()

    def broadcast(self, obj: T) -> T:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        return list(values)

    def wrap(self, model: Parcae) -> nn.Module:
        return model

    def shard_batches(self, batches: list[Batch]) -> list[Batch]:
        return batches

    def reduce_depth_results(self, results: list[DepthResult]) -> list[DepthResult]:
        return results

    def load_checkpoint(
        self, manager: CheckpointManager, path: Path, model: Parcae, optimizer: MuonAdamW
    ) -> dict[str, Any]:
        return manager.load(path, model, optimizer)


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


def _check_optimizer_groups(saved: dict[str, Any], optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The single-process check (`Optimizer.load_state_dict`), made on rank 0 before any collective."""
    mine = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g["params"]) for g in saved["param_groups"]]
    if mine != theirs:
        raise CheckpointError(
            f"checkpoint {path} does not match this optimizer: parameter groups of sizes {theirs}, expected {mine}"
        )


def _cpu_model(config: Any, weights: dict[str, Tensor]) -> Parcae:
    """A CPU model holding full `weights`: `load_weights` checks them and `save_pretrained` writes them, so the
    distributed paths share the single-process format code."""
    with torch.device("meta"):
        model = Parcae(config)
    model.load_weights(weights, device="cpu")
    return model


class ShardedMuonAdamW(MuonAdamW):
    """`MuonAdamW` for FSDP2-sharded (DTensor) parameters.

    AdamW is element-wise and runs on each rank's shards unchanged. Muon orthogonalises whole matrices: the
    momentum stays sharded (its update is element-wise); the Nesterov direction is all-gathered (one
    all-gather per matrix, the size of a gradient), orthogonalised and NorMuon-normalised on every rank —
    identical inputs, so every rank computes the same update — and each rank applies its own rows. The
    arithmetic mirrors `MuonAdamW._muon_step` operation for operation (tests/test_distributed.py checks that
    FSDP matches DDP); the redundant orthogonalisation costs far less than the forward and backward.
    """

    def _muon_step(self, group: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not any(isinstance(p, DTensor) for p in group["params"]):
            super()._muon_step(group)
            return
        beta = group["momentum"]
        for params in self._by_shape(group):
            directions = []
            for p in params:
                state = self._muon_state(p)  # sharded like p; the second moment whole, the same on every rank
                state["momentum_buffer"].lerp_(p.grad, 1 - beta)
                directions.append(p.grad.lerp(state["momentum_buffer"], beta).full_tensor())
            update = self._normuon(orthogonalize(torch.stack(directions), group["ns_steps"]).float(), params, group)
            for i, p in enumerate(params):
                # This rank's rows of the (identical) full update: a local slice, no communication.
                step = distribute_tensor(update[i].to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                self._apply_update(p, step, group)


# ---------------------------------------------------------------------- the data stream across world sizes
def restore_packer(packer: BestFitPacker, saved: list[dict[str, Any]]) -> str | None:
    """Put this rank's `packer` where the checkpointed run left the data; `saved` holds every rank's packer state.

    Same world size: rank r takes state r and the stream continues exactly (bit for bit).

    Another world size W′ (the partition i % W changes, so no per-rank position carries over):
    1. every document piece still pending in an old rank's buffer — documents already started but not
       finished, and documents drawn but not yet placed — goes, once, to the buffer of rank doc % W′;
    2. every rank then starts epoch E + 1 of the new partition, E being the furthest epoch any old rank had
       reached, in the order the packer always uses for that epoch.
    Guarantees: no token is lost from a started document and none is trained twice because of the change;
    epoch E + 1 covers every document exactly once across the ranks. Documents of epoch E that no old rank had
    drawn yet are not trained on in epoch E (they are in E + 1 with all the others).
    Returns a one-line description when the stream was re-derived, None when it continued exactly.
    """
    if len(saved) == packer.world_size:
        packer.load_state_dict(saved[packer.rank])
        return None
    fresh = packer.state_dict()
    for state in saved:
        changed = [k for k in ("num_docs", "seq_len", "seed", "shuffle") if state["config"][k] != fresh["config"][k]]
        if changed:
            detail = ", ".join(f"{k} {state['config'][k]} → {fresh['config'][k]}" for k in changed)
            raise ValueError(f"Packer state was saved for a different stream ({detail}).")
    epoch = max(int(state["epoch"]) for state in saved)
    pending = sorted(tuple(piece) for state in saved for piece in state["buffer"])
    mine = [list(piece) for piece in pending if piece[0] % packer.world_size == packer.rank]
    # A cursor at the end of epoch E's permutation: the packer's next refill starts epoch E + 1.
    end = len(rank_documents(packer.store.num_docs, packer.rank, packer.world_size))
    packer.load_state_dict({**fresh, "epoch": epoch, "cursor": end, "buffer": mine})
    return (
        f"data: resumed {len(saved)} rank(s) as {packer.world_size}: {len(pending)} pending document pieces "
        f"carried over, then epoch {epoch + 1} of the new partition"
    )


class InterleavedPacker:
    """The micro-batches of a W-rank run, in one process: rank 0's batch, rank 1's, …, rank W−1's, again.

    A single-process trainer with this packer and grad_accum = W (× the ranks' own accumulation) computes the
    gradient of a W-rank DDP run exactly — a way to check a cluster run against one device (fixed depths and
    zero h₀ make the two agree to rounding; sampled depths and h₀ are seeded per rank and micro-step).
    """

    def __init__(self, packers: Sequence[BestFitPacker]) -> None:
        self.packers = list(packers)
        self._turn = 0

    def next_batch(self) -> tuple[Tensor, Tensor]:
        packer = self.packers[self._turn]
        self._turn = (self._turn + 1) % len(self.packers)
        return packer.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"turn": self._turn, "packers": [p.state_dict() for p in self.packers]}
