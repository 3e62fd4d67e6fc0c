"""Kill tests: `parcae train` is SIGKILLed at 7 points (6 inside checkpoint writes) and runs out of disk once,
resuming after each; the per-step losses and the final weights must equal an uninterrupted run's, and after
every fault each checkpoint directory verifies and `latest` names one of them.

The processes are real `parcae train` runs (`parcae.cli.main`) forked from a forkserver that imported torch
once; `python benchmarks/faults.py` runs the long randomized campaign in fresh interpreters.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import faults
from faults import Fault

STEPS = 20
FAULTS = [
    Fault("point", point="weights-written", save=1),  # no checkpoint yet: --resume says so, restart with --overwrite
    Fault("point", point="before-latest", save=1),  # step-2 complete but no `latest`: the error names it
    Fault("time", steps=3),  # the parent kills it once it has logged 3 steps
    Fault("point", point="before-rename", save=2),  # a complete temp dir left behind
    Fault("disk-full"),  # every checkpoint write fails midway with EFBIG: stops after 3, `latest` untouched
    Fault("point", point="optimizer-written", save=2),  # a partial temp dir left behind
    Fault("point", point="before-latest", save=2),  # a newer complete step-* than `latest`: re-saved after resume
    Fault("point", point="before-prune", save=1),  # `latest` moved, old checkpoints not yet pruned
]


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL, RLIMIT_FSIZE and the forkserver are POSIX/Linux")
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run(tmp_path: Path) -> None:
    launcher = faults.Launcher("fork")
    corpus = faults.write_corpus(tmp_path / "corpus")
    reference = tmp_path / "reference"
    uninterrupted = launcher.start(faults.train_argv(corpus, reference, STEPS), Fault(), tmp_path / "reference.log")
    lines: list[str] = []
    run = tmp_path / "run"
    counts = faults.run_chain(launcher, corpus, run, FAULTS, STEPS, echo=lines.append)
    assert uninterrupted.wait(300) == 0, (tmp_path / "reference.log").read_text()[-2000:]

    assert counts.kills_in_checkpoint_writes == 6 and counts.kills_at_random_times == 1, lines
    assert counts.disk_full == 1 and counts.restarted == 1 and counts.not_triggered == 0, lines
    assert counts.resumed == 7 and counts.states_verified > 0  # every process after a fault but the restart
    assert any("--checkpoint step-00000002" in line for line in lines), lines
    assert faults.step_losses(run) == faults.step_losses(reference)  # every step's loss, bit for bit
    assert sorted(faults.step_losses(run)) == list(range(1, STEPS + 1))
    assert faults.same_final_weights(run, reference)
    assert faults.check_checkpoints(run) >= 1
    assert (tmp_path / "run.old-1" / "run_config.json").is_file()  # --overwrite moved the first attempt aside
