"""The stability lab: the divergence rule on synthetic curves, the plan, and tiny grids end to end."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

import parcae.lab.stability as lab_module
from parcae.cli import main
from parcae.lab.stability import LabConfig, RunCurves, Thresholds, classify, plan_runs, run_lab
from parcae.train.trainer import Trainer

_STDLIB = Path(sysconfig.get_paths()["stdlib"])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for path in sorted(_STDLIB.glob("*.py"))[:30]:
        (root / (path.stem + ".txt")).write_text(path.read_text(encoding="utf-8", errors="replace"))
    return root


# ---------------------------------------------------------------------- the divergence rule
def curves(loss, state=None, skipped=(), final_norms=None) -> RunCurves:
    steps = list(range(1, len(loss) + 1))
    val = [{"event": "val", "state_norm": final_norms}] if final_norms else []
    state = state if state is not None else [10.0] * len(loss)
    return RunCurves(steps=steps, loss=list(loss), rho_A=[0.5] * len(loss), state_norm=list(state),
                     skipped_steps=list(skipped), validations=val)  # fmt: skip


def verdict(run: RunCurves, **kwargs):
    options = dict(warmup_steps=3, d_state=64, mean_recurrence=4, thresholds=Thresholds(max_state_rms=100.0))
    return classify(run, **{**options, **kwargs})


def test_a_healthy_run_converges() -> None:
    result = verdict(curves([5.8, 6.0, 5.0, 4.0, 3.0], final_norms={"4": 20.0, "8": 21.0}))
    assert not result.diverged and result.describe() == "✓"


def test_each_divergence_reason_is_detected() -> None:
    falling = [5.8, 5.0, 4.0, 3.0, 2.5]
    assert verdict(curves(falling, skipped=[4])).reasons == ("nan",)
    assert verdict(curves(falling), stopped=True).reasons == ("nan",)
    assert verdict(curves([5.8, 5.0, 4.0, 3.0, 5.9])).reasons == ("loss",)
    assert verdict(curves([5.8, 5.0, 4.0, 3.0, math.nan])).reasons == ("nan",)
    # 100 · √64 = 800 is the state-norm limit; a non-finite norm is a blow-up too.
    assert verdict(curves(falling, state=[10, 50, 900, 60, 70])).reasons == ("state-norm",)
    assert verdict(curves(falling, state=[10, 50, math.inf, 60, 70])).reasons == ("state-norm",)
    assert verdict(curves(falling, final_norms={"4": 900.0, "8": 910.0})).reasons == ("state-norm",)
    assert verdict(curves(falling, final_norms={"4": 20.0, "8": 51.0})).reasons == ("state-growth",)
    # Linear growth with depth (a marginally stable loop: at most 2× for twice the depth) is not divergence.
    assert verdict(curves(falling, final_norms={"4": 20.0, "8": 40.0})).reasons == ()


def test_a_loss_above_its_start_during_warm_up_is_not_divergence() -> None:
    assert not verdict(curves([5.8, 6.5, 5.9, 3.0, 2.5])).diverged  # steps 2–3 are the warm-up


# ---------------------------------------------------------------------- the plan
def test_the_plan_shares_the_ablation_base_with_the_grid() -> None:
    lab = LabConfig(injections=("diagonal", "linear"), lrs=(1e-3, 1e-2), seeds=2, ablation_lr=1e-2)
    specs = plan_runs(lab)
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    grid = [s for s in specs if "grid" in s.groups]
    assert len(grid) == 2 * 2 * 2
    base = {s.name: s for s in specs}["diagonal-lr0.01-mu8-s0"]
    assert base.depth_curve and set(base.groups) == {"grid", "ablation:depth-sampling", "ablation:prelude-norm",
                                                     "ablation:zoh"}  # fmt: skip
    extra = sorted(n for n in names if n.endswith("s0") and n not in {s.name for s in grid})
    assert extra == ["diagonal-per-batch-lr0.01-mu8-s0", "diagonal-pn-lr0.01-mu8-s0", "diagonal-zoh-lr0.01-mu8-s0"]
    linear = {s.name: s for s in specs}["linear-lr0.001-mu8-s1"]
    assert linear.model_config(lab).prelude_norm is False and linear.model_config(lab).injection == "linear"


def test_the_default_lab_plans_twelve_runs(capsys) -> None:
    assert main(["lab", "stability", "--out", "unused", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("12 runs × 200 steps = 2,400")
    assert main(["lab", "stability", "--out", "unused", "--quick", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("6 runs × 60 steps")
    assert main(["lab", "stability", "--out", "unused", "--set", "lr=1e-3", "--dry-run"]) == 2
    assert "model fields only" in capsys.readouterr().err


def test_the_device_defaults_to_auto_like_train_and_is_recorded_resolved(capsys, monkeypatch) -> None:
    from parcae.train.config import TrainConfig

    assert TrainConfig().device == "auto"  # the lab follows `parcae train`
    for cuda in (False, True):  # nothing runs: a dry run only plans, so pretending CUDA exists is safe
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        expected = "cuda" if cuda else "cpu"
        assert LabConfig().device == expected and LabConfig().to_dict()["device"] == expected
        assert main(["lab", "stability", "--out", "unused", "--quick", "--dry-run"]) == 0
        assert capsys.readouterr().out.rstrip().endswith(f"optimizer steps on {expected}")
    assert LabConfig(device="cpu").device == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        LabConfig(device="tpu")


def test_invalid_labs_are_refused_with_one_sentence() -> None:
    with pytest.raises(ValueError, match="unknown injection"):
        LabConfig(injections=("concat",))
    with pytest.raises(ValueError, match="set by the lab"):
        LabConfig(model_overrides={"injection": "add"})
    with pytest.raises(ValueError, match="warmup_steps"):
        LabConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="no loop"):
        LabConfig(preset="gpt-tiny")


# ---------------------------------------------------------------------- end to end
def tiny_lab(corpus: Path, **overrides) -> LabConfig:
    fields = dict(preset="parcae-micro", data=str(corpus), lrs=(1e-3,), steps=6, warmup_steps=1, batch_size=2,
                  seq_len=32, eval_batches=1, log_every=1, jacobian_every=3, jacobian_sequences=1, jacobian_steps=6,
                  ablations=(), device="cpu")  # fmt: skip
    return LabConfig(**{**fields, **overrides})


def test_a_two_run_quick_grid_runs_end_to_end(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "lab"
    argv = ["lab", "stability", "--preset", "parcae-micro", "--data", str(corpus), "--injections", "diagonal,add",
            "--lrs", "1e-3", "--quick", "--steps", "6", "--warmup-steps", "1", "--batch-size", "2", "--seq-len", "32",
            "--jacobian-every", "3", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "Stability matrix" in report and "Jacobian of the loop map" in report
    results = json.loads((out / "results.json").read_text())["runs"]
    assert [r["name"] for r in results] == ["diagonal-lr0.001-mu4-s0", "add-lr0.001-mu4-s0"]
    for r in results:
        assert r["verdict"].startswith(("✓", "✗")) and r["steps_done"] == 6
        assert [j["step"] for j in r["jacobian"]] == [3, 6]
        assert all(math.isfinite(j["rho_J"]) and j["rho_J"] >= 0 for j in r["jacobian"])
        assert set(r["val_loss_by_depth"]) == {"1", "2", "4", "8"}
    add = results[1]
    assert add["jacobian"][-1]["rho_A"] == 1.0
    for name in ("report.md", "loss.png", "rho_A.png", "state_norm.png", "jacobian.png"):
        assert (out / name).is_file(), name
    assert (out / "data").is_dir()  # tokenized once, shared

    # The same command continues the lab: nothing is retrained.
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done earlier") == 2
    # Other settings in the same directory are refused; nothing is overwritten.
    assert main([*argv[:-2], "--seeds", "2", "--out", str(out)]) == 2
    assert "other settings (seeds 1 → 2)" in capsys.readouterr().err


def test_jacobian_probes_do_not_change_training(corpus: Path, tmp_path: Path) -> None:
    lab = tiny_lab(corpus, injections=("diagonal",))
    run_lab(lab, tmp_path / "lab", echo=lambda _: None)
    (spec,) = plan_runs(lab)
    data = tmp_path / "lab" / "data"
    Trainer(spec.model_config(lab), spec.train_config(lab, data), tmp_path / "plain", progress_bar=False,
            echo=lambda _: None).train()  # fmt: skip
    probed, plain = RunCurves.read(tmp_path / "lab" / "runs" / spec.name), RunCurves.read(tmp_path / "plain")
    assert probed.loss == plain.loss and probed.state_norm == plain.state_norm


def test_a_diverging_run_is_recorded_and_the_ablations_are_evaluated(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class PoisonedTrainer(Trainer):
        """Non-finite gradients in the exact-ZOH run from step 3 on: the trainer's guard stops it."""

        def __init__(self, model_config, *args, on_backward=None, **kwargs) -> None:
            def poisoned(step: int, model) -> None:
                on_backward(step, model)
                if model_config.injection == "diagonal-zoh" and step >= 2:
                    model.embed.weight.grad.fill_(float("nan"))

            super().__init__(model_config, *args, on_backward=poisoned, **kwargs)

    monkeypatch.setattr(lab_module, "Trainer", PoisonedTrainer)
    lab = tiny_lab(corpus, injections=("diagonal",), steps=12, ablations=("zoh",), ablation_lr=1e-3)
    results = {r["name"]: r for r in run_lab(lab, tmp_path / "lab", echo=lambda _: None)}
    assert set(results) == {"diagonal-lr0.001-mu4-s0", "diagonal-zoh-lr0.001-mu4-s0"}
    zoh = results["diagonal-zoh-lr0.001-mu4-s0"]
    assert zoh["diverged"] and "nan" in zoh["reasons"] and "consecutive" in zoh["error"]
    assert zoh["steps_done"] == 2 + 8  # 8 = max_consecutive_skips
    for r in results.values():
        assert sorted(int(t) for t in r["depth_curve"]) == list(range(1, 9))  # T = 1 … 2μ
    report = (tmp_path / "lab" / "report.md").read_text()
    assert "Ablations" in report and "diagonal-zoh-lr0.001-mu4-s0 | zoh | ✗ nan" in report
    assert (tmp_path / "lab" / "ablation_depth.png").is_file()
