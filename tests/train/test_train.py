"""The trainer end to end on small CPU runs: learning, exact resume, checkpoints, guardrails, CLI errors."""

from __future__ import annotations

import json
import math
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
    (saved,) = (run / "eval").glob("loss-*.json")  # named by checkpoint and settings (parcae eval --help)
    assert "T" in out and saved.with_suffix(".png").is_file()
    results = json.loads(saved.read_text())["results"]
    assert [r["depth"] for r in results] == [1, 2, 4]
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "8", "--steps", "2"]) == 0
    assert capsys.readouterr().out.startswith("def ")


# ---------------------------------------------------------------------- every family, budgets, user-facing options
@pytest.fixture(scope="module")
def prepared(corpus: Path, tmp_path_factory) -> Path:
    """A few modules tokenized once (byte level), with a validation split: what the CLI runs below train on."""
    from parcae.data.shards import prepare
    from parcae.data.tokenizer import get_tokenizer

    source = tmp_path_factory.mktemp("few")
    for path in sorted(corpus.iterdir())[:8]:
        (source / path.name).write_text(path.read_text())
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(str(source), get_tokenizer("byte"), out, val_fraction=0.25, progress=False)
    return out


def tiny_cli_run(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--seq-len", "32", "--batch-size", "2", "--out", str(out), "--no-progress",
            "--set", "optimizer=adamw", "--set", "eval_batches=1", *extra]  # fmt: skip


@pytest.mark.parametrize("preset", ["parcae-tiny", "rdm-add-tiny", "rdm-linear-tiny", "gpt-tiny"])
def test_every_model_family_trains_through_the_cli(preset: str, prepared: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    # Depth 2 keeps the looped models fast; log_every=1 logs both steps.
    extra = ("--set", "mean_recurrence=2", "--set", "log_every=1")
    assert main(tiny_cli_run(prepared, run, "--preset", preset, "--steps", "2", *extra)) == 0
    assert "step 1/2 · loss" in capsys.readouterr().out  # --no-progress: a status line instead of a bar
    curve = losses(run)
    assert sorted(curve) == [1, 2] and all(math.isfinite(loss) for loss in curve.values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_val_loss"]
    assert (run / "checkpoints" / "step-00000002" / "model.safetensors").is_file()
    assert json.loads((run / "run_config.json").read_text())["model"]["name"] == preset


# Trainer-level runs below: the smallest that exercise what they test.
FAST = dict(batch_size=2, seq_len=32, eval_batches=1, optimizer="adamw")


class FakeClock:
    """Stands in for the trainer's `time` module: seconds pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_a_time_budget_stops_before_a_step_would_overrun_it(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("parcae.train.trainer.time", clock)
    validate = Trainer._validate

    def slow_validation(self: Trainer):
        clock.now += 8.0
        return validate(self)

    monkeypatch.setattr(Trainer, "_validate", slow_validation)

    def six_seconds(step: int, _model) -> None:
        clock.now += 6.0

    model, train = small_run(prepared, **FAST, steps=None, minutes=1.0, eval_every=4)
    trainer = Trainer(model, train, tmp_path / "run", progress_bar=False, echo=lambda _: None,
                      on_backward=six_seconds)  # fmt: skip
    summary = trainer.train()
    # 4 steps and a validation: 32 s; then 38, 44, 50 s. An 8th step would end at 56 s, but the validation
    # due after it (8 s, as the last one) at 64 s > 60 s: the run stops at 7 steps.
    assert summary["steps"] == 7 and summary["train_seconds"] == 50.0
    assert summary["wall_seconds"] == 58.0  # the closing validation is not budgeted but is reported


def test_the_time_bar_never_shows_more_than_its_total() -> None:
    from parcae.train.budget import ProgressDisplay

    display = ProgressDisplay(bar=True, status_every=0.0, minutes=0.5, echo=print, val_depth=4)
    display.open(total_steps=None, step=0, elapsed=0.0)
    record = {"step": 9, "loss": 2.0, "tok_per_s": 100.0}
    display.show(record, {4: 2.5}, elapsed=31.7, fraction=1.06, now=0.0)  # a validation may end past the budget
    assert (display.bar.n, display.bar.total) == (30, 30) and "30/30 s" in str(display.bar)
    display.close()


def test_loop_times_and_the_budget_check() -> None:
    from parcae.train.budget import LoopTimes, time_allows_step

    times = LoopTimes(window=3)
    assert times.estimate() is None and time_allows_step(59.0, 60.0, None)  # the first step: nothing known
    times.add_step(30.0)  # a first step carries one-off warm-up ...
    times.add_step(2.0)  # ... and is forgotten once a representative one exists
    assert times.estimate() == 2.0
    for seconds in (3.0, 1.0, 1.0):
        times.add_step(seconds)
    assert times.estimate() == 3.0
    times.add_step(1.0)  # the window holds the last three
    assert times.estimate() == 1.0
    times.add_validation(4.0)
    times.add_checkpoint(0.5)
    assert times.estimate(validates=True) == 5.0 and times.estimate(validates=True, checkpoints=True) == 5.5
    assert time_allows_step(59.0, 60.0, 1.0) and not time_allows_step(59.5, 60.0, 1.0)


def test_status_lines_without_a_progress_bar(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("parcae.train.trainer.time", clock)
    lines: list[str] = []

    def seven_seconds(step: int, _model) -> None:
        clock.now += 7.0

    model, train = small_run(prepared, **FAST, steps=6, eval_every=100)
    Trainer(model, train, tmp_path / "run", progress_bar=False, echo=lines.append, on_backward=seven_seconds,
            status_every=10).train()  # fmt: skip
    status = [line for line in lines if line.startswith("step ")]
    # After the first step, then once 10 s have passed since the last line: at 7, 21 and 35 s.
    assert [line.split(" · ")[0] for line in status] == ["step 1/6", "step 3/6", "step 5/6"]
    assert all("loss" in line and "tok/s" in line and line.endswith("%)") for line in status)
    assert status[1].endswith("21 s (50%)")


def test_lr_help_says_what_it_sets_for_each_optimizer(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "AdamW learning rate" not in text
    assert "muon_lr" in text and "optimizer=adamw, every parameter" in text


def test_warmup_steps_and_fractions_give_the_same_schedule() -> None:
    from parcae.train.schedule import scheduled_lr

    common = dict(warmup=0.0, cooldown=0.3, min_ratio=0.1)
    for kind in ("trapezoid", "cosine"):
        for step in range(20):
            by_steps = scheduled_lr(step, 0.0, 20, kind, **{**common, "warmup_steps": 5})
            by_fraction = scheduled_lr(step, 0.0, 20, kind, **{**common, "warmup": 0.25, "warmup_steps": None})
            assert math.isclose(by_steps, by_fraction), (kind, step)
    # Under a time budget, the steps ramp multiplies the rest of the schedule.
    assert math.isclose(scheduled_lr(1, 0.1, None, "constant", warmup=0.5, warmup_steps=4, cooldown=0.0), 1.5 / 4)
    assert scheduled_lr(4, 0.1, None, "constant", warmup=0.5, warmup_steps=4, cooldown=0.0) == 1.0


def test_resume_with_a_new_budget_keeps_the_warmup(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, train = small_run(prepared, **FAST, steps=2, warmup=0.5, cooldown=0.0, eval_every=100)
    Trainer(model, train, run, progress_bar=False, echo=lambda _: None).train()
    lines: list[str] = []

    def stop(step: int, _model) -> None:
        trainer.request_stop()  # one step of the new budget is enough

    trainer = Trainer(None, TrainConfig(steps=8), run, resume=True, progress_bar=False, echo=lines.append,
                      on_backward=stop)  # fmt: skip
    trainer.train()
    note = next(line for line in lines if line.startswith("resumed with a new budget"))
    assert "budget 2 steps → 8 steps" in note and "warm-up kept at 1 step (" in note
    assert json.loads((run / "run_config.json").read_text())["train"]["warmup_steps"] == 1
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 50 % of 8 steps would put step 3 back into the warm-up (LR × 2.5/4); the kept 1-step warm-up is over.
    assert next(e["lr"] for e in entries if e.get("step") == 3 and "event" not in e) == train.lr
    assert any(e.get("event") == "budget" and e["to"] == {"steps": 8} for e in entries)


def test_list_keys_shows_every_key_with_its_type_default_and_help(capsys) -> None:
    assert main(["train", "--list-keys", "--preset", "gpt-tiny"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    from dataclasses import fields

    from parcae import ParcaeConfig

    assert set(rows) == {f.name for f in fields(ParcaeConfig)} | {f.name for f in fields(TrainConfig)}
    assert rows["n_prelude"].split()[1:3] == ["int", "6"]  # the preset's value
    assert rows["warmup_steps"].split()[1:5] == ["int", "|", "null", "null"]
    assert "wins over warmup" in rows["warmup_steps"]
    assert "trapezoid | cosine | constant" in rows["schedule"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mean_recurence=4", "did you mean 'mean_recurrence'?"),
        ("model.dmodel=64", "unknown model field 'dmodel' in --set; did you mean 'd_model'?"),
        ("train.learning_rate=1", "unknown training field 'learning_rate'"),
        ("zzz=1", "(not a model or training field). `parcae train --list-keys` lists every key."),
    ],
)
def test_an_unknown_set_key_suggests_close_matches_and_list_keys(override: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_overrides([override])
    assert message in str(info.value) and "--list-keys" in str(info.value)


def test_an_unknown_key_in_a_config_file_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("preset: parcae-micro\nmodel: {n_cores: 2}\n")
    with pytest.raises(ValueError, match=r"unknown model field 'n_cores' in .*c.yaml; did you mean 'n_core'"):
        build_configs(None, str(tmp_path / "c.yaml"), [], {"steps": 1})


def test_vocab_size_follows_the_tokenizer_unless_given(corpus: Path, tmp_path: Path) -> None:
    from parcae.data.tokenizer import train_bpe
    from parcae.train.config import fit_vocab_to_tokenizer, sets_vocab

    texts = [path.read_text() for path in sorted(corpus.iterdir())[:4]]
    train_bpe(texts, 400).save(tmp_path / "tok")
    model_cfg, train_cfg = build_configs("parcae-micro", None, [], {"tokenizer": str(tmp_path / "tok")})
    assert not sets_vocab(None, [])
    fitted, note = fit_vocab_to_tokenizer(model_cfg, train_cfg, explicit=False)
    assert fitted.vocab_size == 448 and note.startswith("vocab_size 320 → 448 from the tokenizer (400 tokens")
    assert fit_vocab_to_tokenizer(model_cfg, TrainConfig(), explicit=False) == (model_cfg, None)  # bytes: 320
    explicit = model_cfg.replace(vocab_size=512)
    assert sets_vocab(None, ["vocab_size=512"])
    assert fit_vocab_to_tokenizer(explicit, train_cfg, explicit=True) == (explicit, None)
    with pytest.raises(ValueError, match="vocab_size 384 is smaller than the tokenizer's 400 tokens"):
        fit_vocab_to_tokenizer(model_cfg.replace(vocab_size=384), train_cfg, explicit=True)


def test_a_run_without_validation_says_why(corpus: Path, tmp_path: Path, capsys) -> None:
    from parcae.data.shards import val_split_note

    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(corpus.iterdir())[:3]:
        (few / path.name).write_text(path.read_text())
    run = tmp_path / "run"
    assert main(tiny_cli_run(few, run, "--preset", "parcae-micro", "--steps", "1", "--set", "val_fraction=0")) == 0
    reason = val_split_note(run / "data")
    assert reason and "val_fraction is 0" in reason
    assert f"note: {reason}" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_val_loss"] is None and summary["validation"] == reason
