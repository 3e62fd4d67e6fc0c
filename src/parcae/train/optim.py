"""The paper's optimiser: Muon (Polar Express, NorMuon, cautious weight decay) for the hidden matrices of
Attention/MLP, AdamW for everything else (Table 20). Parameters are assigned by module type, never by name."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

from ..model.layers import MLP, Attention
from .config import TrainConfig

# Coefficients (a, b, c) of 5 steps X ← aX + b(XXᵀ)X + c(XXᵀ)²X, Polar Express (arXiv 2505.16932), 2 % safety factor.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(update: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate U·Vᵀ of update = U·S·Vᵀ for a [..., rows, cols] batch of matrices (Polar Express)."""
    if steps > len(POLAR_EXPRESS):
        raise ValueError(f"Polar Express has coefficients for at most {len(POLAR_EXPRESS)} steps, got {steps}.")
    # bf16 matmuls on accelerators (as the paper); fp32 on CPU, where bf16 is slower and no more useful.
    x = update.bfloat16() if update.is_cuda else update.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT  # iterate on the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + eps)
    for a, b, c in POLAR_EXPRESS[:steps]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).to(update.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Each param group's `algorithm` ∈ {"muon", "adamw"}: one optimiser keeps checkpoints and LR schedules uniform."""

    def __init__(self, param_groups: list[dict]) -> None:
        defaults = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, momentum=0.95, beta2=0.95, ns_steps=5)
        for group in param_groups:
            if group.get("algorithm") not in ("muon", "adamw"):
                raise ValueError(f"param group algorithm must be 'muon' or 'adamw', got {group.get('algorithm')!r}.")
            group.setdefault("base_lr", group.get("lr", defaults["lr"]))
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_step if group["algorithm"] == "muon" else self._adamw_step)(group)
        return loss

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            elif state["step"].device != p.device:  # e.g. restored from a checkpoint read on the CPU
                state["step"] = state["step"].to(p.device)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        # torch's AdamW kernel (torch.optim.AdamW's maths), fused: one pass, not ~8 (memory-bound on the embeddings).
        fused = all(p.device.type in ("cpu", "cuda") and type(p) is nn.Parameter for p in params)
        adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], fused=fused, foreach=None if fused else False, amsgrad=False, maximize=False,
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
        )  # fmt: skip

    def _muon_step(self, group: dict) -> None:
        beta = group["momentum"]
        for params in self._by_shape(group):
            grads = torch.stack([p.grad for p in params])
            momenta = torch.stack([self._muon_state(p)["momentum_buffer"] for p in params])
            momenta.lerp_(grads, 1 - beta)
            update = self._normuon(orthogonalize(grads.lerp(momenta, beta), group["ns_steps"]).float(), params, group)
            for i, p in enumerate(params):
                self.state[p]["momentum_buffer"].copy_(momenta[i])
                self._apply_update(p, update[i].to(p.dtype), group)

    @staticmethod
    def _by_shape(group: dict) -> list[list[Tensor]]:
        """The group's parameters with a gradient, by shape: one batched orthogonalisation serves each shape."""
        by_shape: dict[torch.Size, list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                by_shape[p.shape].append(p)
        return list(by_shape.values())

    def _muon_state(self, p: Tensor) -> dict:
        """Momentum and NorMuon's second moment (per row of a tall matrix, per column of a wide one), made lazily."""
        state = self.state[p]
        if not state:
            rows, cols = p.shape
            state["momentum_buffer"] = torch.zeros_like(p)
            reduced = (rows, 1) if rows >= cols else (1, cols)
            state["second_moment"] = torch.zeros(reduced, dtype=torch.float32, device=p.device)
        return state

    def _normuon(self, update: Tensor, params: list[Tensor], group: dict) -> Tensor:
        """NorMuon: each row (tall) / column (wide) of [n, rows, cols] over its running RMS (updated); norms kept."""
        reduce_dim = -1 if update.shape[-2] >= update.shape[-1] else -2
        second = torch.stack([self.state[p]["second_moment"] for p in params])
        second.lerp_(update.square().mean(dim=reduce_dim, keepdim=True), 1 - group["beta2"])
        for i, p in enumerate(params):
            self.state[p]["second_moment"].copy_(second[i])
        norm_before = update.norm(dim=(-2, -1), keepdim=True)
        update = update * second.clamp_min(1e-20).rsqrt()
        return update * (norm_before / update.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-20))

    @staticmethod
    def _apply_update(p: Tensor, step: Tensor, group: dict) -> None:
        """Cautious weight decay (where the update agrees in sign with p), then the step at LR·√max(1, rows/cols)."""
        if group["weight_decay"]:
            cautious = (step * p) >= 0
            p.sub_(p * cautious, alpha=group["lr"] * group["weight_decay"])
        p.sub_(step, alpha=group["lr"] * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))


class ShardedMuonAdamW(MuonAdamW):
    """`MuonAdamW` for FSDP2 DTensors: AdamW and the momentum stay sharded; Muon's direction is all-gathered per matrix,
    orthogonalised identically on every rank, and each rank applies its own rows (op for op as `MuonAdamW`)."""

    def _muon_step(self, group: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not any(isinstance(p, DTensor) for p in group["params"]):
            return super()._muon_step(group)
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


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(muon, adamw) by module type: the hidden projections of Attention/MLP go to Muon."""
    muon: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (Attention, MLP)):
            for child in module.children():
                if isinstance(child, nn.Linear) and child is not getattr(module, "ve_gate", None):
                    muon[id(child.weight)] = child.weight
    return list(muon.values()), [p for p in model.parameters() if id(p) not in muon]


def build_optimizer(model: nn.Module, config: TrainConfig, *, sharded: bool = False) -> MuonAdamW:
    """The optimiser `config` names over `model`; `sharded`: its parameters are FSDP2 DTensors."""
    muon, rest = split_parameters(model) if config.optimizer == "muon" else ([], list(model.parameters()))
    adam = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, weight_decay=config.weight_decay)
    groups = [dict(params=rest, algorithm="adamw", lr=config.lr, **adam)]
    if muon:  # NorMuon's β₂ and the number of Polar Express steps are the recipe's, not settings
        muon_settings = dict(momentum=config.muon_momentum, weight_decay=config.muon_weight_decay, beta2=0.95)
        groups.append(dict(params=muon, algorithm="muon", lr=config.muon_lr, **muon_settings, ns_steps=5))
    return (ShardedMuonAdamW if sharded else MuonAdamW)(groups)
