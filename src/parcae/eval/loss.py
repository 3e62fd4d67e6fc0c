"""Validation loss as a function of the test-time depth T.

A looped model's quality depends on how many iterations it is given at test time; every number here is
reported per T. Evaluation is deterministic: fixed depth, h₀ from a fixed seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..model.parcae import IGNORE_INDEX, Parcae

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class DepthResult:
    depth: int
    loss: float  # mean nats per target token
    tokens: int
    state_norm: float | None = None  # mean ‖h_T‖ per token
    residual: float | None = None  # mean ‖h_T − h_{T−1}‖ per token

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity}


@torch.no_grad()
def loss_by_depth(
    model: Parcae, batches: Sequence[Batch], depths: Sequence[int], *, state_seed: int = 0
) -> list[DepthResult]:
    """Token-weighted mean loss over `batches` at each depth (a fixed-depth model ignores the depth)."""
    if not batches:
        raise ValueError("no validation batches to evaluate on.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = []
    try:
        for depth in depths:
            total, count, norm, residual = 0.0, 0, 0.0, 0.0
            for inputs, labels in batches:
                inputs, labels = inputs.to(device), labels.to(device)
                steps = depth if model.config.is_looped else None
                out = model(inputs, labels=labels, num_steps=steps, state_seed=state_seed, return_logits=False)
                n = int((labels != IGNORE_INDEX).sum())
                total += float(out.loss) * n
                count += n
                if out.metrics:
                    norm += float(out.metrics["state_norm"]) * n
                    residual += float(out.metrics["recurrent_residual"]) * n
            looped = model.config.is_looped
            results.append(
                DepthResult(
                    depth=depth,
                    loss=total / max(count, 1),
                    tokens=count,
                    state_norm=norm / max(count, 1) if looped else None,
                    residual=residual / max(count, 1) if looped else None,
                )
            )
    finally:
        model.train(was_training)
    return results


def format_table(results: Sequence[DepthResult]) -> str:
    lines = [f"{'T':>4}  {'loss':>8}  {'ppl':>9}  {'‖h_T‖':>9}  {'‖h_T−h_T−1‖':>12}"]
    for r in results:
        norm = f"{r.state_norm:9.3f}" if r.state_norm is not None else f"{'-':>9}"
        residual = f"{r.residual:12.4f}" if r.residual is not None else f"{'-':>12}"
        lines.append(f"{r.depth:>4}  {r.loss:8.4f}  {r.perplexity:9.3f}  {norm}  {residual}")
    return "\n".join(lines)


def plot_depth_curve(results: Sequence[DepthResult], path: str | Path, title: str, train_depth: int | None) -> None:
    """Loss vs test-time depth T, with the training mean depth marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r.depth for r in results], [r.loss for r in results], marker="o")
    if train_depth is not None:
        ax.axvline(train_depth, color="gray", linestyle="--", label=f"μ_rec = {train_depth}")
        ax.legend()
    ax.set_xlabel("test-time depth T")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
