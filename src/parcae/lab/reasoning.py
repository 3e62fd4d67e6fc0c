"""`parcae lab reasoning` (README § Reasoning lab): does looping turn extra iterations into sequential reasoning?
Exact match is scored with teacher forcing: argmax at every answer position equals greedy decoding's result."""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.tokenizer import ByteTokenizer
from ..model.config import ParcaeConfig, get_preset
from ..model.exit import ExitCriterion
from ..model.parcae import IGNORE_INDEX, Parcae
from ..plotting import decorate, pyplot, save
from ..train.config import TrainConfig
from ..train.optim import build_optimizer
from ..train.schedule import lr_multiplier
from .tasks import Example, get_task, make_splits


@dataclass
class EncodedSet:
    """Examples as right-padded rows: inputs [N, L], labels [N, L] (answer positions only), difficulties [N]."""

    inputs: Tensor
    labels: Tensor
    difficulty: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


def encode(examples: Sequence[Example], tokenizer: ByteTokenizer, length: int | None = None) -> EncodedSet:
    rows, answer_starts = [], []
    for ex in examples:
        prompt = [tokenizer.bos_id, *tokenizer.encode(ex.prompt)]
        rows.append(prompt + tokenizer.encode(ex.answer))
        answer_starts.append(len(prompt))
    width = max(len(r) for r in rows) if length is None else length
    if any(len(r) > width for r in rows):
        raise ValueError(f"an example needs {max(len(r) for r in rows)} tokens, more than the {width} available.")
    ids = torch.full((len(rows), width + 1), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, answer_starts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, start - 1 : len(row) - 1] = torch.tensor(row[start:])  # predict each answer token
    return EncodedSet(ids[:, :width], labels, torch.tensor([ex.difficulty for ex in examples]))


@dataclass
class Contestant:
    name: str
    config: ParcaeConfig
    model: Parcae = field(init=False)
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def fixed_depth_configs(looped: ParcaeConfig) -> tuple[ParcaeConfig, ParcaeConfig]:
    """(parameter-matched, FLOP-matched) Transformers built from the looped model's blocks.

    Parameter match: the same number of distinct layers (untied head pays for Parcae's B, C; see `gpt-tiny`).
    FLOP match: as many layers as the looped model runs per token in training, n_pre + n_coda + n_core·E[T],
    so forward work per token is equal (backward differs: Parcae truncates it to μ_bwd steps).
    """
    base = dict(n_core=0, n_coda=0, tie_embeddings=False, name="gpt-params")
    params = looped.replace(n_prelude=looped.n_layers, **base)
    expected_depth = looped.mean_recurrence + math.exp(-looped.mean_recurrence)  # E[max(1, Poisson(μ))]
    layers = round(looped.n_prelude + looped.n_coda + looped.n_core * expected_depth)
    flops = looped.replace(n_prelude=layers, **{**base, "name": "gpt-flops"})
    return params, flops


def train_model(
    contestant: Contestant, data: EncodedSet, steps: int, batch_size: int, lr: float, seed: int, echo
) -> None:
    torch.manual_seed(seed)
    model = contestant.model = Parcae(contestant.config)
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", lr=lr, adam_beta1=0.9, adam_beta2=0.95))
    generator = torch.Generator().manual_seed(seed)  # the same batches for every contestant
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_multiplier(step / steps, "trapezoid", 0.05, 0.3)
        rows = torch.randint(0, len(data), (batch_size,), generator=generator)
        out = model(data.inputs[rows], labels=data.labels[rows], step=step, return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        contestant.losses.append(out.loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            echo(f"  {contestant.name}: step {step + 1}/{steps}, loss {sum(contestant.losses[-20:]) / 20:.4f}")
    contestant.seconds = time.perf_counter() - start


@torch.no_grad()
def exact_match_by_depth(model: Parcae, data: EncodedSet, depths: Sequence[int], batch_size: int = 256) -> list[Tensor]:
    """Per-example correctness [N] at each depth, from one run of the loop per batch (`Parcae.logits_by_depth`)."""
    model.eval()
    correct: dict[int, list[Tensor]] = {t: [] for t in depths}
    for start in range(0, len(data), batch_size):
        inputs, labels = data.inputs[start : start + batch_size], data.labels[start : start + batch_size]
        answer = labels != IGNORE_INDEX
        for t, logits in model.logits_by_depth(inputs, depths).items():
            correct[t].append(((logits.argmax(-1) == labels) | ~answer).all(dim=1))
    return [torch.cat(correct[t]) for t in depths]


@torch.no_grad()
def exact_match_with_exit(
    model: Parcae, data: EncodedSet, criterion: ExitCriterion, max_steps: int, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """(correct [N], mean core iterations over each example's answer positions [N]) with adaptive exit, from one
    cached forward per batch (teacher forcing); the right padding comes after the answer, so cannot affect it."""
    model.eval()
    correct, iterations = [], []
    for start in range(0, len(data), batch_size):
        inputs, labels = data.inputs[start : start + batch_size], data.labels[start : start + batch_size]
        cache = model.new_cache(inputs.shape[0], inputs.shape[1], max_steps=max_steps)
        out = model.forward_cached(inputs, cache, num_steps=max_steps, exit=criterion)
        answer = labels != IGNORE_INDEX
        correct.append(((out.logits.argmax(-1) == labels) | ~answer).all(dim=1))
        iterations.append((out.iterations * answer).sum(1) / answer.sum(1))
    return torch.cat(correct), torch.cat(iterations).float()


def accuracy_table(values: Tensor, difficulty: Tensor, difficulties: Sequence[int]) -> dict[int, float]:
    """The mean of `values` (correctness, or iterations used) per difficulty that has test examples."""
    return {d: float(values[difficulty == d].float().mean()) for d in difficulties if bool((difficulty == d).any())}


def run_reasoning_lab(
    task_name: str,
    train_difficulties: list[int],
    test_difficulties: list[int],
    out: Path,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    train_per_difficulty: int = 20_000,
    test_per_difficulty: int = 200,
    preset: str = "parcae-tiny",
    exit: str = "latent:0.01",
    seed: int = 0,
    echo=print,
) -> dict[str, Any]:
    task = get_task(task_name)
    tokenizer = ByteTokenizer()
    train_examples, test_examples = make_splits(
        task, train_difficulties, test_difficulties, train_per_difficulty, test_per_difficulty, seed
    )
    train_set, test_set = encode(train_examples, tokenizer), encode(test_examples, tokenizer)
    context = max(train_set.inputs.shape[1], test_set.inputs.shape[1])
    looped = get_preset(preset, max_seq_len=max(context, 16))
    if context > get_preset(preset).max_seq_len:
        raise ValueError(f"difficulty {max(test_difficulties)} needs {context} tokens, beyond the model's context.")
    contestants = [Contestant("parcae", looped), *(Contestant(cfg.name, cfg) for cfg in fixed_depth_configs(looped))]
    if steps is None:
        steps = _calibrate_steps(contestants, train_set, batch_size, minutes or 10.0)
    echo(f"task {task.name}: {len(train_set)} train / {len(test_set)} test examples, {steps} steps × {batch_size}")
    for contestant in contestants:
        train_model(contestant, train_set, steps, batch_size, lr, seed, echo)
    depths = list(range(1, 3 * looped.mean_recurrence + 1))
    results: dict[str, Any] = {
        "task": task.name, "train_difficulties": train_difficulties, "test_difficulties": test_difficulties,
        "steps": steps, "batch_size": batch_size,
        "test_examples": {d: int((test_set.difficulty == d).sum()) for d in test_difficulties}, "models": {},
    }  # fmt: skip
    table = functools.partial(accuracy_table, difficulty=test_set.difficulty, difficulties=test_difficulties)
    for contestant in contestants:
        model = contestant.model
        entry: dict[str, Any] = {
            "params": model.num_parameters(),
            "train_seconds": round(contestant.seconds, 1),
            "final_train_loss": sum(contestant.losses[-20:]) / min(20, len(contestant.losses)),
        }
        if model.config.is_looped:
            echo(f"  {contestant.name}: exact match at T = 1 … {max(depths)}")
            by_depth = exact_match_by_depth(model, test_set, depths)
            entry["accuracy_by_depth"] = {str(t): table(correct) for t, correct in zip(depths, by_depth, strict=True)}
            echo(f"  {contestant.name}: adaptive exit ({exit}, at most {max(depths)} iterations)")
            criterion = ExitCriterion.parse(exit)
            correct, used = exact_match_with_exit(model, test_set, criterion, max(depths))
            accuracy, iterations = table(correct), table(used)
            entry["adaptive_exit"] = dict(
                criterion=exit, max_steps=max(depths), accuracy=accuracy, iterations=iterations
            )
        else:
            (correct,) = exact_match_by_depth(model, test_set, [model.config.mean_recurrence])
            entry["accuracy"] = table(correct)
        results["models"][contestant.name] = entry
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = format_report(results, looped.mean_recurrence)
    (out / "report.md").write_text(report + "\n")
    echo(report)
    plot_reasoning(results, looped.mean_recurrence, out)
    return results


def _calibrate_steps(contestants: list[Contestant], data: EncodedSet, batch_size: int, minutes: float) -> int:
    """Steps that fit `minutes` for all contestants together, from 3 timed steps of each."""
    per_step = 0.0
    for contestant in contestants:
        probe = Contestant(contestant.name, contestant.config)
        train_model(probe, data, 3, batch_size, 1e-3, 0, lambda _: None)
        per_step += probe.seconds / 3
    return max(10, int(minutes * 60 / per_step))


def format_report(results: dict[str, Any], mean: int) -> str:
    models, lines = results["models"], []
    difficulties = results["test_difficulties"]
    trained = set(results["train_difficulties"])
    header = f"{'difficulty':<22} " + " ".join(f"{d:>5}{'*' if d not in trained else ' '}" for d in difficulties)
    lines += [f"exact match (* = beyond training range), {results['steps']} steps", header]
    parcae = models["parcae"]["accuracy_by_depth"]
    rows = [(f"parcae T={t}", parcae[str(t)]) for t in (1, mean // 2, mean, 2 * mean, 3 * mean) if str(t) in parcae]
    exit_result = models["parcae"].get("adaptive_exit")
    if exit_result:
        rows.append((f"parcae {exit_result['criterion']}", exit_result["accuracy"]))
    rows += [(name, models[name]["accuracy"]) for name in models if "accuracy" in models[name]]

    def cells(values: dict[int, float], scale: float, digits: int) -> str:  # "–": no test example
        return " ".join(f"{scale * values[d]:5.{digits}f} " if d in values else f"{'–':>5} " for d in difficulties)

    counts = results.get("test_examples", {})
    lines.append(f"{'test examples':<22} " + " ".join(f"{counts.get(d, 0):>5} " for d in difficulties))
    for label, acc in rows:
        lines.append(f"{label:<22} " + cells(acc, 100, 1))
    if exit_result:
        lines.append(f"{'iterations used (exit)':<22} " + cells(exit_result["iterations"], 1, 2))
    sizes = ", ".join(f"{n} {m['params']:,} / {m['train_seconds']} s" for n, m in models.items())
    lines.append(f"params / train seconds: {sizes}")
    return "\n".join(lines)


def plot_reasoning(results: dict[str, Any], mean: int, out: Path) -> None:
    plt = pyplot()
    difficulties = results["test_difficulties"]
    by_depth = results["models"]["parcae"]["accuracy_by_depth"]
    depths = sorted(int(t) for t in by_depth)
    grid = [[by_depth[str(t)].get(d, float("nan")) for d in difficulties] for t in depths]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    image = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(difficulties)), difficulties)
    ax.set_yticks(range(len(depths)), depths)
    ax.set(
        xlabel="difficulty", ylabel="test-time depth T", title=f"{results['task']}: Parcae exact match (μ_rec = {mean})"
    )
    fig.colorbar(image, ax=ax)
    save(fig, out / "parcae_heatmap.png")

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for t in (1, mean, 3 * mean):
        accuracy = [by_depth[str(t)].get(d, float("nan")) for d in difficulties]
        ax.plot(difficulties, accuracy, marker="o", label=f"parcae T={t}")
    for name, model in results["models"].items():
        if "accuracy" in model:
            accuracy = [model["accuracy"].get(d, float("nan")) for d in difficulties]
            ax.plot(difficulties, accuracy, marker="s", linestyle="--", label=name)
    ax.axvspan(min(results["train_difficulties"]) - 0.5, max(results["train_difficulties"]) + 0.5, alpha=0.1)
    decorate(ax, "difficulty (shaded: training range)", "exact match", legend=0)
    save(fig, out / "accuracy_by_difficulty.png")
