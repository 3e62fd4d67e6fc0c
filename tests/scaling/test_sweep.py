"""isoFLOP planner arithmetic and the resumable runner, end to end on a tiny corpus (plan → run → CSV → fit)."""

from __future__ import annotations

import csv
import json
import math
import sysconfig
from pathlib import Path

import pytest

from parcae import get_preset
from parcae.cli import main
from parcae.scaling.flops import effective_params, flops_per_token
from parcae.scaling.sweep import RESULT_COLUMNS, SweepPlan, estimate_seconds, make_plan, run_sweep
from parcae.train.config import TrainConfig, build_configs

_STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for path in sorted(_STDLIB.glob("*.py"))[:12]:
        (root / (path.stem + ".txt")).write_text(path.read_text(encoding="utf-8", errors="replace"))
    return root


def test_planner_token_arithmetic() -> None:
    model = get_preset("parcae-micro")
    train = TrainConfig(batch_size=4, seq_len=64, steps=999)
    budgets, recurrences = [3e10, 1e11], [1, 2, 3, 6]
    plan = make_plan(model, train, budgets, recurrences, eval_depths=[1, 4])
    tokens_per_step = 4 * 64
    assert [(r.budget_flops, r.mean_recurrence) for r in plan.runs] == [(b, m) for b in budgets for m in recurrences]
    for run in plan.runs:
        cfg = model.replace(mean_recurrence=run.mean_recurrence, backprop_depth=math.ceil(run.mean_recurrence / 2))
        assert run.backprop_depth == cfg.backprop_depth
        assert run.flops_per_token == flops_per_token(cfg, 64).total
        assert run.steps == round(run.budget_flops / run.flops_per_token / tokens_per_step)
        assert run.tokens == run.steps * tokens_per_step
        # Whole steps: the trained FLOPs miss the budget by at most half a step.
        assert abs(run.tokens * run.flops_per_token - run.budget_flops) <= tokens_per_step * run.flops_per_token / 2
        assert run.params == effective_params(cfg)
        assert run.eval_depths == tuple(sorted({1, 4, run.mean_recurrence}))
        assert plan.model_config(run).mean_recurrence == run.mean_recurrence
        assert plan.train_config(run).steps == run.steps
    assert plan.train["eval_batches"] == 0 and plan.train["steps"] is None  # the runner evaluates, once


def test_planner_rejects_bad_grids() -> None:
    train = TrainConfig(batch_size=4, seq_len=64)
    with pytest.raises(ValueError, match="less than one step"):
        make_plan(get_preset("parcae-micro"), train, [1e6], [2])
    with pytest.raises(ValueError, match="needs a looped model"):
        make_plan(get_preset("gpt-tiny"), train, [1e12], [2])
    with pytest.raises(ValueError, match="must not repeat"):
        make_plan(get_preset("parcae-micro"), train, [1e12, 1e12], [2])


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_plan_run_resume_and_fit(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan_path = tmp_path / "sweep.json"
    argv = [
        "sweep", "plan", "--preset", "parcae-micro", "--data", str(corpus), "--set", "max_seq_len=32",
        "--set", "val_fraction=0.2", "--set", "optimizer=adamw", "--set", "lr=3e-3", "--batch-size", "2",
        "--budgets", "2e8,4e8", "--recurrences", "1,2", "--eval-depths", "1,3", "--eval-batches", "1",
        "--out", str(plan_path),
    ]  # fmt: skip
    assert main(argv) == 0
    assert main(argv) == 2  # a plan is never overwritten
    assert "already exists" in capsys.readouterr().err
    plan = SweepPlan.load(plan_path)
    assert len(plan.runs) == 4 and all(1 <= r.steps <= 6 for r in plan.runs)
    assert estimate_seconds(plan, probe_steps=1, echo=lambda _: None) > 0

    messages: list[str] = []
    results = run_sweep(plan_path, echo=messages.append)
    rows = read_rows(results)
    assert tuple(rows[0]) == RESULT_COLUMNS
    assert len(rows) == sum(len(r.eval_depths) for r in plan.runs)  # one row per run × eval depth
    for run in plan.runs:
        mine = [r for r in rows if r["run"] == run.name]
        assert [int(r["eval_depth"]) for r in mine] == list(run.eval_depths)
        assert {int(r["tokens"]) for r in mine} == {run.tokens}
        assert {int(r["params"]) for r in mine} == {run.params}
        assert all(math.isfinite(float(r["val_loss"])) for r in mine)
    assert sum("tokenizing" in m for m in messages) == 1  # once for the whole sweep

    # Resumable: finished runs are skipped, nothing is appended twice; an interrupted run is resumed.
    summary_file = tmp_path / "sweep" / plan.runs[-1].name / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps({**summary, "interrupted": True}))
    messages.clear()
    run_sweep(plan_path, echo=messages.append)
    assert read_rows(results) == rows
    assert sum("already trained, skipped" in m for m in messages) == 3
    assert any("resuming" in m for m in messages)
    assert json.loads(summary_file.read_text())["interrupted"] is False

    # --emit: torchrun commands for unfinished runs, with config files the trainer accepts.
    (tmp_path / "sweep" / plan.runs[0].name / "summary.json").unlink()
    lines: list[str] = []
    run_sweep(plan_path, echo=lines.append, emit=True, nproc=2)
    commands = [line for line in lines if line.startswith("torchrun")]
    assert len(commands) == 1 and "--nproc-per-node 2 -m parcae train --resume" in commands[0]
    assert lines[-1].startswith("parcae sweep run")

    # Fits on the sweep's CSV: two recurrences per budget are too few for a parabola (a clear error); the
    # test-time fit runs.
    assert main(["fit", "isoflop", str(results), "--out", str(tmp_path / "iso")]) == 2
    assert "a parabola needs at least 3" in capsys.readouterr().err
    assert main(["fit", "testtime", str(results), "--out", str(tmp_path / "tt")]) == 0
    assert (tmp_path / "tt" / "fit.json").is_file()


def test_emitted_config_builds_the_planned_run(corpus: Path, tmp_path: Path) -> None:
    plan = make_plan(
        get_preset("parcae-micro", max_seq_len=32), TrainConfig(data=str(corpus), batch_size=2), [4e8], [2]
    )
    plan_path = tmp_path / "p.json"
    plan.save(plan_path)
    lines: list[str] = []
    run_sweep(plan_path, echo=lines.append, emit=True)
    config_file = tmp_path / "runs" / "configs" / f"{plan.runs[0].name}.yaml"
    run_dir = tmp_path / "runs" / plan.runs[0].name
    commands = [line for line in lines if line.startswith("torchrun")]
    launcher = "torchrun --nproc-per-node 1 -m parcae train"
    assert commands == [f"{launcher} --config {config_file} --out {run_dir} --no-progress"]
    model_cfg, train_cfg = build_configs(None, str(config_file), [], {})
    assert model_cfg == plan.model_config(plan.runs[0])
    assert train_cfg.steps == plan.runs[0].steps and train_cfg.data == str((tmp_path / "runs" / "data").resolve())


def test_results_csv_with_other_columns_is_not_appended_to(corpus: Path, tmp_path: Path) -> None:
    plan = make_plan(
        get_preset("parcae-micro", max_seq_len=32), TrainConfig(data=str(corpus), batch_size=2), [4e8], [1]
    )
    plan.save(tmp_path / "p.json")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "results.csv").write_text("run,loss\nx,1\n")
    with pytest.raises(ValueError, match="exists with other columns"):
        run_sweep(tmp_path / "p.json", echo=lambda _: None)
