"""Validation loss, perplexity and bits per byte per test-time depth T (the README's "Loss and bits per byte"). Special
targets (a packed row's BOS) carry no text: bits per byte leave them out, as nanochat; loss counts them, as training."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.parcae import IGNORE_INDEX, Parcae
from .scoring import check_integers, evaluating, logit_scores


@dataclass(frozen=True)
class DepthResult:
    depth: int
    loss: float  # mean nats per target token (mean over seeds)
    tokens: int  # target tokens per seed
    state_norm: float | None = None  # mean ‖h_T‖ per token
    residual: float | None = None  # mean ‖h_T − h_{T−1}‖ per token
    loss_std: float = 0.0  # population std of the loss over h₀ seeds
    bpb: float | None = None  # bits per UTF-8 byte (needs token_bytes)
    bpb_std: float | None = None
    bytes: int | None = None  # UTF-8 bytes of the non-special targets per seed
    seeds: tuple[int, ...] = (0,)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def to_dict(self) -> dict:
        return {**asdict(self), "seeds": list(self.seeds), "perplexity": self.perplexity}


def loss_by_depth(
    model: Parcae,
    batches: Sequence[tuple[Tensor, Tensor]],
    depths: Sequence[int],
    *,
    state_seed: int | Sequence[int] = 0,
    token_bytes: np.ndarray | Tensor | None = None,
    progress: bool = False,
) -> list[DepthResult]:
    """Token-weighted mean loss over `batches` at each depth, for one h₀ seed or several. `token_bytes` (a
    tokenizer's `token_bytes()`) adds bits per byte; without it the memory-saving loss path is used (no logits)."""
    from tqdm.auto import tqdm

    if not batches:
        raise ValueError("no validation batches to evaluate on.")
    depths = check_integers(depths, "depths")
    seeds = (state_seed,) if isinstance(state_seed, int) else tuple(state_seed)
    if not seeds:
        raise ValueError("at least one h₀ seed is needed.")
    device = next(model.parameters()).device
    weights = None  # UTF-8 bytes per token id, 0 for ids the tokenizer does not have
    if token_bytes is not None:
        given = torch.as_tensor(np.asarray(token_bytes), dtype=torch.long)[: model.config.vocab_size]
        weights = F.pad(given, (0, model.config.vocab_size - len(given))).to(device)
    total = len(seeds) * len(depths) * len(batches)
    bar = tqdm(total=total, desc="loss", unit="batch", smoothing=0, disable=not progress)
    sums: dict[tuple[int, int], Counter] = {(depth, seed): Counter() for depth in depths for seed in seeds}
    with evaluating(model), bar, torch.no_grad():
        for seed in seeds:
            for inputs, labels in batches:
                inputs, labels = inputs.to(device), labels.to(device)
                valid = labels != IGNORE_INDEX
                n = int(valid.sum())
                nbytes = None if weights is None else weights[labels.clamp(min=0)] * valid
                for depth, metrics, nll, loss in _scores_by_depth(model, inputs, labels, depths, seed, weights):
                    acc = sums[depth, seed]
                    acc["tokens"] += n
                    if nll is None:
                        acc["nats"] += float(loss) * n
                    else:
                        acc["nats"] += float(nll.sum())
                        acc["text_nats"] += float(nll[nbytes > 0].sum())
                        acc["bytes"] += int(nbytes.sum())
                    if metrics:
                        acc["norm"] += float(metrics["state_norm"]) * n
                        acc["residual"] += float(metrics["recurrent_residual"]) * n
                    bar.update()
    looped, with_bytes, results = model.config.is_looped, weights is not None, []
    for depth in depths:
        per_seed = [sums[depth, s] for s in seeds]
        tokens = max(per_seed[0]["tokens"], 1)
        losses = [s["nats"] / tokens for s in per_seed]
        bpbs = [s["text_nats"] / (math.log(2) * s["bytes"]) if s["bytes"] else math.nan for s in per_seed]
        result = DepthResult(
            depth=depth,
            loss=statistics.fmean(losses),
            tokens=per_seed[0]["tokens"],
            state_norm=statistics.fmean(s["norm"] for s in per_seed) / tokens if looped else None,
            residual=statistics.fmean(s["residual"] for s in per_seed) / tokens if looped else None,
            loss_std=statistics.pstdev(losses),
            bpb=statistics.fmean(bpbs) if with_bytes else None,
            bpb_std=statistics.pstdev(bpbs) if with_bytes else None,
            bytes=per_seed[0]["bytes"] if with_bytes else None,
            seeds=seeds,
        )
        results.append(result)
    return results


def _scores_by_depth(
    model: Parcae, inputs: Tensor, labels: Tensor, depths: Sequence[int], seed: int, weights: Tensor | None
) -> Iterator[tuple[int, dict[str, Any], Tensor | None, Tensor | None]]:
    """Scores per depth from one loop run; under FSDP2 (shards gathered only per module forward) a forward each."""
    if _is_fsdp(model):
        for depth in depths:
            steps = depth if model.config.is_looped else None
            if weights is None:
                out = model(inputs, labels=labels, num_steps=steps, state_seed=seed, return_logits=False)
                yield depth, out.metrics, None, out.loss
            else:
                out = model(inputs, num_steps=steps, state_seed=seed)
                yield depth, out.metrics, logit_scores(out.logits, labels, None)[0], None
        return
    for out in model.iterate_depths(inputs, depths, seed):
        metrics: dict[str, Any] = {}
        if out.state is not None and out.previous_state is not None:  # as the forward: token means, then row means
            metrics["state_norm"] = out.state.float().norm(dim=-1).mean()
            metrics["recurrent_residual"] = (out.state - out.previous_state).float().norm(dim=-1).mean()
        nll = None if weights is None else logit_scores(model.lm_head(out.hidden), labels, None)[0]
        yield out.depth, metrics, nll, model.chunked_loss(out.hidden, labels) if weights is None else None


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have sharded the model
        return False
    return isinstance(model, FSDPModule)


def _mean_std(mean: float, std: float, several: bool) -> str:
    return f"{mean:8.4f} ± {std:.4f}" if several else f"{mean:8.4f}"


def format_table(results: Sequence[DepthResult]) -> str:
    several = len(results[0].seeds) > 1 if results else False
    loss_width = 17 if several else 8
    has_bpb = any(r.bpb is not None for r in results)
    bpb_header = f"  {'bpb':>{loss_width}}" if has_bpb else ""
    lines = [f"{'T':>4}  {'loss':>{loss_width}}  {'ppl':>9}{bpb_header}  {'‖h_T‖':>9}  {'‖h_T−h_T−1‖':>12}"]
    for r in results:
        loss = _mean_std(r.loss, r.loss_std, several)
        bpb = "  " + _mean_std(r.bpb or math.nan, r.bpb_std or 0.0, several) if has_bpb else ""
        norm = f"{r.state_norm:9.3f}" if r.state_norm is not None else f"{'-':>9}"
        residual = f"{r.residual:12.4f}" if r.residual is not None else f"{'-':>12}"
        lines.append(f"{r.depth:>4}  {loss}  {r.perplexity:9.3f}{bpb}  {norm}  {residual}")
    return "\n".join(lines)


def plot_depth_curve(results: Sequence[DepthResult], path: str | Path, title: str, train_depth: int | None) -> None:
    """Loss vs test-time depth T (error bars: std over h₀ seeds), with the training mean depth marked."""
    from ..plotting import decorate, pyplot, save

    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=120)
    depths, losses = [r.depth for r in results], [r.loss for r in results]
    ax.errorbar(depths, losses, yerr=[r.loss_std for r in results], marker="o", capsize=3)
    if train_depth is not None:
        ax.axvline(train_depth, color="gray", linestyle="--", label=f"μ_rec = {train_depth}")
    decorate(ax, "test-time depth T", "validation loss (nats/token)", title, legend=None if train_depth is None else 0)
    save(fig, Path(path))
