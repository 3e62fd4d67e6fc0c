"""Numerical faults: NaN/Inf injected into activations, gradients and the loss at chosen steps are skipped
(no update), counted and logged while the run goes on; a run that keeps diverging, with non-finite or with
finite but meaningless losses, is stopped with a diagnosis naming ρ(Ā) and ‖h_T‖.

Faults are injected from outside the trainer: forward hooks on a core block (activations) or on the model
(its output's loss), and the trainer's `on_backward` hook (gradients)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from parcae import get_preset
from parcae.cli import main
from parcae.data.shards import prepare
from parcae.data.tokenizer import ByteTokenizer
from parcae.train.config import TrainConfig
from parcae.train.trainer import Trainer, TrainingError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from faults import step_losses, write_corpus

STEPS = 8
POISONED = {2, 5}  # 1-based steps


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("numerics")
    prepare(str(write_corpus(root / "corpus", docs=60)), ByteTokenizer(), root / "data", progress=False)
    return root / "data"


def config(data: Path, **fields) -> TrainConfig:
    base = dict(data=str(data), seq_len=32, batch_size=2, steps=STEPS, log_every=1, eval_batches=0,
                checkpoint_every=100, lr=3e-3, muon_lr=3e-3)  # fmt: skip
    return TrainConfig(**{**base, **fields})


def poison(tensor: torch.Tensor, value: float) -> torch.Tensor:
    return tensor + value if value == float("inf") else tensor * value  # Inf stays Inf; NaN spreads


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("site", ["activation", "gradient", "loss"])
def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on(
    site: str, value: float, data: Path, tmp_path
) -> None:
    weights: list[torch.Tensor] = []  # the parameters before each step's update

    def on_backward(step: int, model) -> None:  # `step` steps are done; this is step + 1
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        if site == "gradient" and step + 1 in POISONED:
            model.core[0].mlp.up_proj.weight.grad.fill_(value)

    trainer = Trainer(get_preset("parcae-micro"), config(data), tmp_path / "run", progress_bar=False,
                      echo=lambda _: None, on_backward=on_backward)  # fmt: skip
    in_poisoned_step = lambda module: module.training and trainer.progress.step + 1 in POISONED  # noqa: E731
    if site == "activation":
        trainer.model.core[0].register_forward_hook(
            lambda module, args, out: poison(out, value) if in_poisoned_step(module) else None
        )
    elif site == "loss":
        trainer.model.register_forward_hook(
            lambda module, args, out: dataclasses.replace(out, loss=poison(out.loss, value))
            if in_poisoned_step(module) else None
        )  # fmt: skip
    summary = trainer.train()

    assert summary["steps"] == STEPS and summary["skipped_steps"] == len(POISONED)
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(e["step"] for e in entries if e.get("event") == "skip") == sorted(POISONED)
    final = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    weights.append(final)
    for step in range(1, STEPS + 1):  # a skipped step leaves every weight as it was; any other step updates
        assert torch.equal(weights[step - 1], weights[step]) == (step in POISONED), step
    assert torch.isfinite(final).all()
    clean = [loss for step, loss in step_losses(tmp_path / "run").items() if step not in POISONED]
    assert len(clean) == STEPS - len(POISONED) and all(isinstance(x, float) for x in clean)


def test_persistent_non_finite_activations_stop_with_rho_and_state_norm(data: Path, tmp_path) -> None:
    trainer = Trainer(get_preset("parcae-micro"), config(data, max_consecutive_skips=3), tmp_path / "run",
                      progress_bar=False, echo=lambda _: None)  # fmt: skip
    trainer.model.core[0].register_forward_hook(lambda module, args, out: out * float("nan"))
    with pytest.raises(TrainingError, match=r"3 consecutive steps had a non-finite .*ρ\(Ā\) = 0\.\d+, ‖h_T‖ = nan"):
        trainer.train()
    assert trainer.progress.step == 3


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_a_finite_divergence_is_stopped_with_its_likely_cause(data: Path, tmp_path, capsys) -> None:
    # The additive injection (ρ(Ā) = 1) at a learning rate far too high: the loss explodes to hundreds of nats
    # while staying finite, so only the divergence guard can stop it.
    argv = [
        "train", "--preset", "parcae-micro", "--set", "injection=add", "--set", "prelude_norm=false", "--set",
        "optimizer=adamw", "--lr", "3", "--set", "max_consecutive_skips=3", "--set", "log_every=1", "--set",
        "eval_batches=0", "--steps", "30", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--data", str(data),
    ]  # fmt: skip
    code, err = run_cli([*argv, "--out", str(tmp_path / "diverged")], capsys)
    assert code == 1 and err.startswith("parcae: error:") and "\n" not in err
    assert "stayed above 2 × ln 320 = 11.54" in err and "3 consecutive steps" in err
    assert "ρ(Ā) = 1.000 ≥ 1: the linear part of the loop is not contractive, ‖h_T‖ = " in err
    losses = step_losses(tmp_path / "diverged")
    stopped = max(losses)
    assert stopped < 30 and all(losses[s] > 11.54 for s in range(stopped - 2, stopped + 1))
    # Without the guard the same run trains to the end on finite, meaningless losses.
    code, _ = run_cli([*argv, "--set", "divergence_factor=0", "--out", str(tmp_path / "unguarded")], capsys)
    assert code == 0 and min(step_losses(tmp_path / "unguarded")[s] for s in range(stopped, 31)) > 11.54
