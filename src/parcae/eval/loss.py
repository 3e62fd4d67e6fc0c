"""Validation loss, perplexity and bits per byte as a function of the test-time depth T.

A looped model's quality depends on how many iterations it is given at test time; every number here is
reported per T. Evaluation is deterministic: fixed depth, h₀ from a fixed seed; with several seeds each
figure is the mean over seeds and `*_std` its population standard deviation (as the official CORE
reports), which measures the sensitivity to the random h₀.

Bits per byte = Σ nats over the non-special targets / (ln 2 · Σ UTF-8 bytes of those targets). A target's
bytes come from `Tokenizer.token_bytes()`, which counts the raw bytes a token stands for, so a byte-level
BPE token that ends in the middle of a character counts its own bytes (the official code decodes each
token and counts the replacement character's 3 bytes instead). Special targets (the BOS that opens the
next document in a packed row) carry no text: they are left out of both sums, as in nanochat. `loss` and
perplexity are over every target, as in training.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..model.parcae import IGNORE_INDEX, Parcae
from .scoring import check_depths, evaluating, logit_scores, model_device, token_scores

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class DepthResult:
    depth: int
    loss: float  # mean nats per target token (mean over seeds)
    tokens: int  # target tokens per seed
    state_norm: float | None = None  # mean ‖h_T‖ per token
    residual: float | None = None  # mean ‖h_T − h_{T−1}‖ per token
    loss_std: float = 0.0  # population std of the loss over seeds
    bpb: float | None = None  # bits per UTF-8 byte (needs token_bytes)
    bpb_std: float | None = None
    bytes: int | None = None  # UTF-8 bytes of the non-special targets per seed
    seeds: tuple[int, ...] = (0,)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def to_dict(self) -> dict:
        return {**asdict(self), "seeds": list(self.seeds), "perplexity": self.perplexity}


@dataclass
class _Sums:
    nats: float = 0.0
    tokens: int = 0
    text_nats: float = 0.0  # over non-special targets only
    bytes: int = 0
    norm: float = 0.0
    residual: float = 0.0


def loss_by_depth(
    model: Parcae,
    batches: Sequence[Batch],
    depths: Sequence[int],
    *,
    state_seed: int | Sequence[int] = 0,
    token_bytes: np.ndarray | Tensor | None = None,
    progress: bool = False,
) -> list[DepthResult]:
    """Token-weighted mean loss over `batches` at each depth (a fixed-depth model ignores the depth).

    `state_seed`: one h₀ seed or several (mean ± std over them). `token_bytes` (a tokenizer's
    `token_bytes()`) adds bits per byte; without it the memory-saving loss path is used (no logits).
    """
    if not batches:
        raise ValueError("no validation batches to evaluate on.")
    depths = check_depths(depths)
    seeds = (state_seed,) if isinstance(state_seed, int) else tuple(state_seed)
    if not seeds:
        raise ValueError("at least one h₀ seed is needed.")
    device = model_device(model)
    weights = None
    if token_bytes is not None:
        weights = torch.zeros(model.config.vocab_size, dtype=torch.long)
        given = torch.as_tensor(np.asarray(token_bytes), dtype=torch.long)
        weights[: len(given)] = given[: model.config.vocab_size]
        weights = weights.to(device)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(seeds) * len(depths) * len(batches), desc="loss", unit="batch", smoothing=0,
               disable=not progress)  # fmt: skip
    sums = {(depth, seed): _Sums() for depth in depths for seed in seeds}
    with evaluating(model), bar, torch.no_grad():
        for seed in seeds:
            for inputs, labels in batches:
                inputs, labels = inputs.to(device), labels.to(device)
                for depth, metrics, nll, loss in _scores_by_depth(model, inputs, labels, depths, seed, weights):
                    _accumulate(sums[depth, seed], labels, weights, metrics, nll, loss)
                    bar.update()
    return [_summarise(depth, seeds, [sums[depth, s] for s in seeds], model.config.is_looped, weights is not None)
            for depth in depths]  # fmt: skip


def _scores_by_depth(
    model: Parcae, inputs: Tensor, labels: Tensor, depths: Sequence[int], seed: int, weights: Tensor | None
) -> Iterator[tuple[int, dict[str, Any], Tensor | None, Tensor | None]]:
    """(depth, loop metrics, per-token nll or None, mean loss or None) for each depth: per-token losses when bits
    per byte are wanted (`weights`), else the chunked mean loss that never holds [B, L, V] logits.

    One run of the loop serves every depth (`Parcae.iterate_depths`), except for an FSDP2-sharded model: it
    gathers a module's shards only around that module's own forward, so there each depth is one forward."""
    if _is_fsdp(model):
        for depth in depths:
            steps = depth if model.config.is_looped else None
            if weights is None:
                out = model(inputs, labels=labels, num_steps=steps, state_seed=seed, return_logits=False)
                yield depth, out.metrics, None, out.loss
            else:
                scores = token_scores(model, inputs, labels, num_steps=depth, state_seed=seed)
                yield depth, scores.metrics, scores.nll, None
        return
    for out in model.iterate_depths(inputs, depths, seed):
        metrics: dict[str, Any] = {}
        if out.state is not None and out.previous_state is not None:
            metrics = {  # as the forward reports them: token means, then the mean over rows
                "state_norm": out.state.float().norm(dim=-1).mean(),
                "recurrent_residual": (out.state - out.previous_state).float().norm(dim=-1).mean(),
            }
        if weights is None:
            yield out.depth, metrics, None, model.chunked_loss(out.hidden, labels)
        else:
            yield out.depth, metrics, logit_scores(model.lm_head(out.hidden), labels, None)[0], None


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have sharded the model
        return False
    return isinstance(model, FSDPModule)


def _accumulate(
    acc: _Sums, labels: Tensor, weights: Tensor | None, metrics: dict[str, Any], nll: Tensor | None,
    loss: Tensor | None,
) -> None:  # fmt: skip
    valid = labels != IGNORE_INDEX
    n = int(valid.sum())
    if nll is None:
        acc.nats += float(loss) * n
    else:
        nbytes = weights[labels.clamp(min=0)] * valid
        acc.nats += float(nll.sum())
        acc.text_nats += float(nll[nbytes > 0].sum())
        acc.bytes += int(nbytes.sum())
    acc.tokens += n
    if metrics:
        acc.norm += float(metrics["state_norm"]) * n
        acc.residual += float(metrics["recurrent_residual"]) * n


def _summarise(
    depth: int, seeds: tuple[int, ...], per_seed: list[_Sums], looped: bool, with_bytes: bool
) -> DepthResult:
    tokens = max(per_seed[0].tokens, 1)
    losses = [s.nats / tokens for s in per_seed]
    bpbs = [s.text_nats / (math.log(2) * s.bytes) if s.bytes else math.nan for s in per_seed]
    return DepthResult(
        depth=depth,
        loss=statistics.fmean(losses),
        tokens=per_seed[0].tokens,
        state_norm=statistics.fmean(s.norm for s in per_seed) / tokens if looped else None,
        residual=statistics.fmean(s.residual for s in per_seed) / tokens if looped else None,
        loss_std=statistics.pstdev(losses),
        bpb=statistics.fmean(bpbs) if with_bytes else None,
        bpb_std=statistics.pstdev(bpbs) if with_bytes else None,
        bytes=per_seed[0].bytes if with_bytes else None,
        seeds=seeds,
    )


def _mean_std(mean: float, std: float, several: bool, width: int, digits: int) -> str:
    if not several:
        return f"{mean:{width}.{digits}f}"
    return f"{mean:{width}.{digits}f} ± {std:.{digits}f}"


def format_table(results: Sequence[DepthResult]) -> str:
    """One line per depth: loss (± std over seeds), perplexity, bits per byte, ‖h_T‖, ‖h_T − h_T−1‖."""
    several = len(results[0].seeds) > 1 if results else False
    loss_width = 17 if several else 8
    has_bpb = any(r.bpb is not None for r in results)
    header = f"{'T':>4}  {'loss':>{loss_width}}  {'ppl':>9}"
    if has_bpb:
        header += f"  {'bpb':>{loss_width}}"
    lines = [header + f"  {'‖h_T‖':>9}  {'‖h_T−h_T−1‖':>12}"]
    for r in results:
        line = f"{r.depth:>4}  {_mean_std(r.loss, r.loss_std, several, 8, 4)}  {r.perplexity:9.3f}"
        if has_bpb:
            line += "  " + _mean_std(r.bpb or math.nan, r.bpb_std or 0.0, several, 8, 4)
        norm = f"{r.state_norm:9.3f}" if r.state_norm is not None else f"{'-':>9}"
        residual = f"{r.residual:12.4f}" if r.residual is not None else f"{'-':>12}"
        lines.append(f"{line}  {norm}  {residual}")
    return "\n".join(lines)


def plot_depth_curve(results: Sequence[DepthResult], path: str | Path, title: str, train_depth: int | None) -> None:
    """Loss vs test-time depth T (error bars: std over h₀ seeds), with the training mean depth marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.errorbar([r.depth for r in results], [r.loss for r in results], yerr=[r.loss_std for r in results],
                marker="o", capsize=3)  # fmt: skip
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
