"""The trainer end to end on small CPU runs: learning, exact resume, checkpoints, guardrails, CLI errors."""

from __future__ import annotations

import json
import platform
import sysconfig
from pathlib import Path

import pytest
import torch

from parcae import get_preset
from parcae.cli import main
from parcae.train.allocator import tune_cpu_allocator
from parcae.train.checkpoint import CheckpointError
from parcae.train.config import TrainConfig, build_configs, parse_overrides
from parcae.train.trainer import Trainer, TrainingError

# A small, fixed corpus: 40 standard-library modules (real code, no download).
_STDLIB = Path(sysconfig.get_paths()["stdlib"])
_MODULES = sorted(p for p in _STDLIB.glob("*.py"))[:40]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for path in _MODULES:
        (root / (path.stem + ".txt")).write_text(path.read_text(encoding="utf-8", errors="replace"))
    return root


def small_run(corpus: Path, **train) -> tuple:
    model = get_preset("parcae-micro", max_seq_len=64)
    fields = dict(data=str(corpus), batch_size=4, seq_len=64, steps=12, eval_every=6, eval_batches=2,
                  checkpoint_every=100, log_every=1, val_fraction=0.1, lr=3e-3, muon_lr=3e-3)  # fmt: skip
    return model, TrainConfig(**{**fields, **train})


def losses(run_dir: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e and "event" not in e}


def test_thirty_steps_lower_the_loss(corpus: Path, tmp_path: Path) -> None:
    model, train = small_run(corpus, steps=30, eval_every=30)
    summary = Trainer(model, train, tmp_path / "run", progress_bar=False, echo=lambda _: None).train()
    curve = losses(tmp_path / "run")
    assert summary["steps"] == 30 and len(curve) == 30
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(26, 31)) / 5
    assert last < first - 0.5, (first, last)
    assert set(summary["final_val_loss"]) == {"1", "2", "4", "8"}
    run = tmp_path / "run"
    assert (run / "tokenizer.json").is_file() and (run / "run_config.json").is_file()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "model.safetensors").is_file()


def test_resume_reproduces_the_uninterrupted_run(corpus: Path, tmp_path: Path) -> None:
    model, train = small_run(corpus)
    Trainer(model, train, tmp_path / "full", progress_bar=False, echo=lambda _: None).train()

    def stop_at_five(step: int, _model) -> None:
        if step == 4:  # during the 5th step: it completes, checkpoints, then stops
            trainer.request_stop()

    trainer = Trainer(model, train, tmp_path / "split", progress_bar=False, echo=lambda _: None,
                      on_backward=stop_at_five)  # fmt: skip
    first = trainer.train()
    assert first["interrupted"] and first["steps"] == 5
    resumed = Trainer(None, None, tmp_path / "split", resume=True, progress_bar=False, echo=lambda _: None).train()
    assert resumed["steps"] == 12
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # bit-for-bit, step for step


def test_corrupt_checkpoint_is_detected_and_the_previous_one_stays_usable(corpus: Path, tmp_path: Path) -> None:
    model, train = small_run(corpus, steps=6, checkpoint_every=3, eval_every=100)
    Trainer(model, train, tmp_path / "run", progress_bar=False, echo=lambda _: None).train()
    checkpoints = tmp_path / "run" / "checkpoints"
    weights = checkpoints / "step-00000006" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt .*step-00000003 is intact"):
        Trainer(None, TrainConfig(steps=8), tmp_path / "run", resume=True, progress_bar=False, echo=lambda _: None)
    trainer = Trainer(None, TrainConfig(steps=8), tmp_path / "run", resume=True, checkpoint="step-00000003",
                      progress_bar=False, echo=lambda _: None)  # fmt: skip
    assert trainer.progress.step == 3
    assert trainer.train()["steps"] == 8


def test_non_finite_gradient_is_skipped_and_counted(corpus: Path, tmp_path: Path) -> None:
    def poison(step: int, model) -> None:
        if step == 2:
            model.embed.weight.grad.fill_(float("nan"))

    model, train = small_run(corpus, steps=6, eval_every=100)
    summary = Trainer(model, train, tmp_path / "run", progress_bar=False, echo=lambda _: None,
                      on_backward=poison).train()  # fmt: skip
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if e.get("event") == "skip"] == [3]
    from parcae import Parcae

    weights = Parcae.from_pretrained(tmp_path / "run" / "checkpoints" / "step-00000006")
    assert all(torch.isfinite(p).all() for p in weights.parameters())


def test_persistent_non_finite_steps_stop_with_a_diagnosis(corpus: Path, tmp_path: Path) -> None:
    def poison(step: int, model) -> None:
        model.embed.weight.grad.fill_(float("inf"))

    model, train = small_run(corpus, steps=20, max_consecutive_skips=3)
    trainer = Trainer(model, train, tmp_path / "run", progress_bar=False, echo=lambda _: None, on_backward=poison)
    with pytest.raises(TrainingError, match=r"3 consecutive steps .*ρ\(Ā\)"):
        trainer.train()


@pytest.mark.parametrize("tune", [True, False])
def test_cpu_training_tunes_the_allocator_unless_told_not_to(
    tune: bool, corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr("parcae.train.trainer.tune_cpu_allocator", lambda: bool(calls.append(1)) or True)
    model, train = small_run(corpus, steps=1, device="cpu", tune_allocator=tune)
    Trainer(model, train, tmp_path / "run", progress_bar=False, echo=lambda _: None)
    assert calls == ([1] if tune else [])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning applies to glibc only")
def test_tune_cpu_allocator_applies_once_on_glibc() -> None:
    assert tune_cpu_allocator() and tune_cpu_allocator()  # idempotent


def test_overrides_and_config_files(tmp_path: Path) -> None:
    model, train = parse_overrides(["mean_recurrence=4", "lr=1e-3", "train.eval_depths=[1, 2]", "model.qk_norm=false"])
    assert model == {"mean_recurrence": 4, "qk_norm": False}
    assert train == {"lr": 1e-3, "eval_depths": [1, 2]}
    (tmp_path / "c.yaml").write_text("preset: parcae-tiny\nmodel: {mean_recurrence: 6}\ntrain: {steps: 5, lr: 2e-3}\n")
    model_cfg, train_cfg = build_configs(None, str(tmp_path / "c.yaml"), ["lr=4e-3"], {"minutes": 1.0})
    assert model_cfg.mean_recurrence == 6 and model_cfg.backprop_depth == 3
    assert train_cfg.lr == 4e-3 and train_cfg.minutes == 1.0 and train_cfg.steps is None
    # JSON written by json.dumps: "1e-05" must stay a number (YAML 1.1 would read it as a string).
    (tmp_path / "c.json").write_text(json.dumps({"preset": "parcae-micro", "model": {"norm_eps": 1e-5},
                                                 "train": {"steps": 2, "lr": 1e-4}}))  # fmt: skip
    model_cfg, train_cfg = build_configs(None, str(tmp_path / "c.json"), [], {})
    assert model_cfg.norm_eps == 1e-5 and train_cfg.lr == 1e-4


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "parcae-9b", "--data", "stdlib"], "Unknown preset"),
        (["--preset", "parcae-micro", "--data", "/nonexistent/corpus.jsonl"], "nonexistent"),
        (["--preset", "parcae-micro", "--set", "depth=3"], "unknown --set key 'depth'"),
        (["--preset", "parcae-micro", "--set", "vocab_size=100"], "vocab_size"),
        (["--preset", "parcae-micro", "--set", "lr=-1"], "lr must be positive"),
        (["--preset", "parcae-micro", "--set", "tune_allocator=maybe"], "tune_allocator"),
        (["--data", "stdlib"], "--preset"),
    ],
)
def test_cli_bad_input_is_one_line(argv, message, corpus: Path, tmp_path: Path, capsys) -> None:
    argv = [a if a != "stdlib" else str(corpus) for a in argv]
    code, err = run_cli(["train", *argv, "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2
    assert err.startswith("parcae: error:") and message in err and "\n" not in err


def test_cli_run_dir_errors(corpus: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = run_cli(["train", "--preset", "parcae-micro", "--data", str(corpus), "--steps", "1",
                         "--out", str(blocker / "run")], capsys)  # fmt: skip
    assert code == 2 and "cannot write to --out" in err
    code, err = run_cli(["train", "--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "not a training run" in err
    argv = ["train", "--preset", "parcae-micro", "--data", str(corpus), "--steps", "2", "--seq-len", "32",
            "--batch-size", "2", "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    code, err = run_cli(argv, capsys)
    assert code == 2 and "already holds a run" in err
    (tmp_path / "run" / "checkpoints" / "latest").unlink()
    code, err = run_cli(["train", "--resume", str(tmp_path / "run")], capsys)
    assert code == 2 and "no checkpoint" in err


def test_cli_eval_and_generate(corpus: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--preset", "parcae-micro", "--data", str(corpus), "--steps", "3", "--seq-len", "32",
                 "--batch-size", "2", "--out", str(run), "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", str(run), "--depths", "1,2,4", "--batches", "2", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "T" in out and (run / "eval" / "loss_by_depth.png").is_file()
    results = json.loads((run / "eval" / "loss_by_depth.json").read_text())["results"]
    assert [r["depth"] for r in results] == [1, 2, 4]
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "8", "--steps", "2"]) == 0
    assert capsys.readouterr().out.startswith("def ")
