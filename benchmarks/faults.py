"""Fault campaign for `parcae train`: SIGKILL it at many points, fill its disk, resume, and compare the result
with an uninterrupted run; then corrupt the finished run's files one at a time and check each is detected.

Every process is a real `parcae train` (`parcae.cli.main`) in its own OS process, killed with SIGKILL, which
no handler can intercept. Faults, one per process, resumed with `parcae train --resume RUN` after each:
- `point`: the process kills itself inside its k-th `CheckpointManager.save`, at one of CHECKPOINT_POINTS
  (model written / optimiser written / temp dir complete / renamed but `latest` not moved / before pruning);
- `time`: the parent kills it at a random moment after it logged n steps (checkpoints are written every
  2 steps, so these land in checkpoint writes too);
- `disk-full`: RLIMIT_FSIZE below the checkpoint size, so every checkpoint write fails midway with a real
  EFBIG; the trainer must warn, go on, stop after 3 failures with a one-line error, and leave `latest` alone.
A kill before the first checkpoint leaves nothing to resume: that run is started again with `--overwrite`;
a kill before the first `latest` pointer is resumed with the `--checkpoint NAME` the error names.
After every process: every `step-*` directory verifies (SHA-256) and `latest` names one of them. At the
end: the per-step training losses (metrics.jsonl) and the final weights equal the uninterrupted run's, bit
for bit. The corruption sweep flips bits in (and truncates) every checkpoint file, shard, offsets file and
index of the finished run: `parcae train --resume` must refuse each with one line and change no file (a flip
that reads back as the same JSON value, `1e-05` → `1E-05`, must change nothing instead).

    python benchmarks/faults.py                      # 6 chains × 8 faults, 60 steps, fresh interpreters
                                                     # (≈ 10 min on 2 cores)
    python benchmarks/faults.py --launcher fork      # the same from a forkserver (≈ 70 s)
tests/train/test_reliability_kill.py runs one fixed chain through `run_chain`. The last line printed is the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Where inside `CheckpointManager.save` a `point` fault kills the process: (function, before | after its call).
CHECKPOINT_POINTS = {
    "weights-written": ("save_pretrained", "after"),  # the temp dir holds model files only
    "optimizer-written": ("save_file", "after"),  # + the optimiser tensors
    "before-rename": ("_fsync_dir", "before"),  # the temp dir is complete, not yet renamed into place
    "before-latest": ("write_atomic", "before"),  # renamed into place; `latest` still names the previous one
    "before-prune": ("_prune", "before"),  # `latest` moved; old checkpoints not pruned, not yet logged
}
CHECKPOINT_EVERY = 2
# What the forkserver imports once (torch._dynamo is otherwise imported lazily, seconds into each child).
PRELOAD = ["torch", "torch._dynamo", "safetensors.torch", "parcae.cli", "parcae.train.trainer", "parcae.data.shards"]
KILLED = -signal.SIGKILL


class CampaignError(AssertionError):
    """A guarantee did not hold (or the campaign itself went wrong); the message says which."""


@dataclass(frozen=True)
class Fault:
    kind: str = "none"  # none | point | time | disk-full
    point: str = ""  # point: a CHECKPOINT_POINTS name
    save: int = 1  # point: during the process's save-th checkpoint write
    steps: int = 1  # time: kill once the process has logged this many steps …
    delay: float = 0.0  # … and this many seconds more

    def describe(self) -> str:
        if self.kind == "point":
            return f"SIGKILL at {self.point} of checkpoint write #{self.save}"
        if self.kind == "time":
            return f"SIGKILL {self.delay:.2f} s after step {self.steps} of the process"
        return self.kind


@dataclass
class Counts:
    kills_in_checkpoint_writes: int = 0
    kills_at_random_times: int = 0
    disk_full: int = 0
    not_triggered: int = 0  # the run ended before the fault's moment came (or a disk-full had nothing to keep)
    resumed: int = 0
    restarted: int = 0  # killed before the first checkpoint: started again with --overwrite
    states_verified: int = 0  # checkpoint directories checked after a fault
    chains: int = 0
    trajectories_identical: int = 0
    weights_identical: int = 0
    corruptions: int = 0
    corruptions_detected: int = 0
    corruptions_harmless: int = 0  # a flip that reads back as the same value (e.g. 1e-05 → 1E-05)

    @property
    def kills(self) -> int:
        return self.kills_in_checkpoint_writes + self.kills_at_random_times

    def add(self, other: Counts) -> None:
        for item in dataclasses.fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    def summary(self) -> str:
        corruptions = ""
        if self.corruptions:
            corruptions = f", corruptions detected {self.corruptions_detected} of {self.corruptions}"
            if self.corruptions_harmless:
                corruptions += f" (the other {self.corruptions_harmless} read back unchanged)"
        unused = f" ({self.not_triggered} more planned but not applicable)" if self.not_triggered else ""
        return (
            f"faults injected {self.kills + self.disk_full} (SIGKILL {self.kills}: {self.kills_in_checkpoint_writes} "
            f"inside checkpoint writes, {self.kills_at_random_times} at random times; disk full {self.disk_full})"
            f"{unused}, runs resumed {self.resumed}, restarted {self.restarted}, checkpoint states verified "
            f"{self.states_verified}, trajectories identical {self.trajectories_identical}/{self.chains}, "
            f"final weights identical {self.weights_identical}/{self.chains}{corruptions}"
        )


# ---------------------------------------------------------------------- the run
def write_corpus(root: Path, docs: int = 160) -> Path:
    """A small local corpus: chunks of standard-library modules, one JSON line each (no download)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    chunks = [text[i : i + 600] for text in texts for i in range(0, min(len(text), 2400), 600)]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": chunk}) + "\n" for chunk in chunks[:docs]), encoding="utf-8")
    return path


def train_argv(corpus: Path, run: Path, steps: int) -> list[str]:
    return [
        "train", "--preset", "parcae-micro", "--data", str(corpus), "--steps", str(steps), "--seq-len", "32",
        "--batch-size", "2", "--device", "cpu", "--no-progress", "--out", str(run),
        "--set", f"checkpoint_every={CHECKPOINT_EVERY}", "--set", "log_every=1", "--set", "eval_every=5",
        "--set", "eval_batches=1", "--set", "val_fraction=0.1",
    ]  # fmt: skip


def step_losses(run: Path) -> dict[int, float]:
    """The training loss of every step in metrics.jsonl (after resumes: of the steps the run kept)."""
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return {e["step"]: e["loss"] for e in entries if "loss" in e and "event" not in e}


def same_final_weights(run: Path, reference: Path) -> bool:
    """Every tensor of the two runs' latest checkpoints equal, bit for bit (the files' bytes may differ:
    safetensors orders its header differently from process to process)."""
    import torch
    from safetensors.torch import load_file

    from parcae.train.checkpoint import CheckpointManager

    a, b = (load_file(CheckpointManager(r).latest() / "model.safetensors") for r in (run, reference))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_checkpoints(run: Path) -> int:
    """Every `step-*` directory verifies and `latest` (when present) names one of them; returns how many."""
    from parcae.train.checkpoint import CheckpointError, CheckpointManager

    manager = CheckpointManager(run)
    complete = manager.list()
    for path in complete:
        try:
            manager.verify(path)
        except CheckpointError as err:
            raise CampaignError(f"a checkpoint was left corrupt: {err}") from None
    latest = manager.latest()
    if latest is not None and latest not in complete:
        raise CampaignError(f"`latest` names {latest.name}, which is not a complete checkpoint")
    # No pointer but checkpoints: a kill between the first rename and the pointer's write; the resume names
    # the newest intact one (`--checkpoint NAME`), which run_chain then follows.
    return len(complete)


# ---------------------------------------------------------------------- the child process
def _child(argv: list[str], fault: Fault, log: str | None, file_limit: int) -> None:
    """Run `parcae` in this (fresh) process with `fault` armed; exits with its status."""
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)  # every process alike: the losses are compared bit for bit
    tqdm.set_lock(threading.RLock())  # its default multiprocessing lock would outlive a SIGKILL (and be warned of)
    if fault.kind == "point":
        _arm(fault)
    elif fault.kind == "disk-full":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    from parcae.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _arm(fault: Fault) -> None:
    """Make this process SIGKILL itself at `fault.point` of its `fault.save`-th checkpoint write."""
    from parcae.model.parcae import Parcae
    from parcae.train import checkpoint

    name, when = CHECKPOINT_POINTS[fault.point]
    owner: Any = {"save_pretrained": Parcae, "_prune": checkpoint.CheckpointManager}.get(name, checkpoint)
    original, original_save = getattr(owner, name), checkpoint.CheckpointManager.save
    saves = [0]

    def save(self: Any, *args: Any, **kwargs: Any) -> Any:
        saves[0] += 1
        return original_save(self, *args, **kwargs)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        armed = saves[0] == fault.save
        if armed and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if armed and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    checkpoint.CheckpointManager.save = save
    setattr(owner, name, wrapper)


class Launcher:
    """Starts child processes: `exec` a fresh `python` each (what a user runs), or `fork` them from a
    forkserver that has imported torch once (the same process boundary, seconds faster per start)."""

    def __init__(self, mode: str) -> None:
        if mode not in ("exec", "fork"):
            raise ValueError(f"unknown launcher {mode!r}; choose exec or fork.")
        self.mode = mode
        if mode == "fork":
            import multiprocessing

            self.context = multiprocessing.get_context("forkserver")
            self.context.set_forkserver_preload(PRELOAD)

    def start(self, argv: list[str], fault: Fault, log: Path, file_limit: int = 0) -> Any:
        if self.mode == "fork":
            process = self.context.Process(target=_child, args=(argv, fault, str(log), file_limit))
            process.start()
            return _ForkHandle(process)
        command = [sys.executable, __file__, "child", json.dumps(dataclasses.asdict(fault)), str(file_limit), *argv]
        with log.open("ab") as out:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


class _ForkHandle:
    """A multiprocessing.Process with the subprocess.Popen methods used here."""

    def __init__(self, process: Any) -> None:
        self.process = process

    def poll(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode


# ---------------------------------------------------------------------- one chain of faults
def _events(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entries.append(json.loads(line))
    return entries


def _steps_since_start(run: Path, starts_before: int) -> int:
    """Steps logged by the current process: records after its `start` event (0 until it has logged one)."""
    entries = _events(run)
    starts = [i for i, e in enumerate(entries) if e.get("event") == "start"]
    if len(starts) <= starts_before:
        return 0
    return sum(1 for e in entries[starts[-1] :] if "loss" in e and "event" not in e)


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_chain(
    launcher: Launcher, corpus: Path, run: Path, faults: list[Fault], steps: int,
    echo: Callable[[str], None] = print, timeout: float = 300.0,
) -> Counts:  # fmt: skip
    """Train `run` to `steps`, one process per fault (each resuming the last), then to the end; check the
    checkpoint invariants after every fault. Returns the counts (the trajectory is compared by the caller)."""
    counts = Counts()
    pending = list(faults)
    command = train_argv(corpus, run, steps)
    resume = ["train", "--resume", str(run), "--no-progress"]
    log = run.with_name(run.name + ".log")
    fresh = True
    for _ in range(2 * len(faults) + 4):
        fault = pending[0] if pending else Fault()
        latest_before = _latest_name(run)
        if fault.kind == "disk-full" and latest_before is None:  # nothing to compare `latest` with: skip it
            counts.not_triggered += 1
            pending.pop(0)
            continue
        # Steps of this process are those after its `start` event (a fresh run, --overwrite too, has a new log).
        starts_before = 0 if fresh else sum(1 for e in _events(run) if e.get("event") == "start")
        limit = _file_limit(run) if fault.kind == "disk-full" else 0
        handle = launcher.start(command if fresh else resume, fault, log, limit)
        if fault.kind == "time":
            deadline = time.monotonic() + timeout
            while handle.poll() is None and time.monotonic() < deadline:
                if _steps_since_start(run, starts_before) >= fault.steps:
                    time.sleep(fault.delay)
                    handle.kill()
                    break
                time.sleep(0.002)
        code = handle.wait(timeout)
        if code is None:
            handle.kill()
            raise CampaignError(f"a training process hung; see {log}")
        last = _last_line(log)
        if code == 2 and "no checkpoint to resume from" in last:
            echo("  nothing to resume (killed before the first checkpoint): starting again with --overwrite")
            command, fresh = [*train_argv(corpus, run, steps), "--overwrite"], True
            counts.restarted += 1
            continue
        if code == 2 and "resume from it with --checkpoint" in last:  # killed before `latest` was first written
            name = last.rsplit("--checkpoint ", 1)[1].strip()
            echo(f"  no `latest` pointer yet: resuming with --checkpoint {name}, as the error says")
            resume = ["train", "--resume", str(run), "--checkpoint", name, "--no-progress"]
            continue
        counts.resumed += not fresh
        resume = ["train", "--resume", str(run), "--no-progress"]
        if code == 0:
            if pending:
                counts.not_triggered += len(pending)
                echo(f"  {fault.describe()}: the run finished first ({len(pending)} planned faults not reached)")
            return counts
        if code == KILLED and fault.kind in ("point", "time"):
            counts.states_verified += check_checkpoints(run)
            if fault.kind == "point":
                counts.kills_in_checkpoint_writes += 1
            else:
                counts.kills_at_random_times += 1
        elif code == 2 and fault.kind == "disk-full":
            if "could not write checkpoint" not in last:
                raise CampaignError(f"a full disk did not stop the run with a clear message: {last!r}")
            counts.states_verified += check_checkpoints(run)
            if _latest_name(run) != latest_before:
                raise CampaignError(f"`latest` moved although no checkpoint could be written ({last})")
            counts.disk_full += 1
        else:
            raise CampaignError(f"unexpected exit {code} under fault {fault.describe()}: {last!r} (see {log})")
        echo(f"  {fault.describe()}: exit {code}; latest {_latest_name(run)}")
        pending.pop(0)
        fresh = False
    raise CampaignError(f"the chain made no progress; see {log}")


def _latest_name(run: Path) -> str | None:
    from parcae.train.checkpoint import CheckpointManager

    latest = CheckpointManager(run).latest()
    return latest.name if latest else None


def _file_limit(run: Path) -> int:
    """Half the largest file of the latest checkpoint: its write fails midway, metrics.jsonl still fits."""
    from parcae.train.checkpoint import CheckpointManager

    latest = CheckpointManager(run).latest()
    assert latest is not None
    return max(p.stat().st_size for p in latest.iterdir()) // 2


def compare(run: Path, reference: Path, counts: Counts) -> None:
    """The chain's per-step losses and final weights against the uninterrupted run's (bit for bit)."""
    got, want = step_losses(run), step_losses(reference)
    if got != want:
        differ = sorted(s for s in set(got) | set(want) if got.get(s) != want.get(s))
        raise CampaignError(f"the resumed trajectory differs at steps {differ[:10]}")
    counts.trajectories_identical += 1
    if not same_final_weights(run, reference):
        raise CampaignError("the resumed run's final weights differ from the uninterrupted run's")
    counts.weights_identical += 1


# ---------------------------------------------------------------------- corruption sweep
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_digests(run: Path) -> dict[str, str]:
    """SHA-256 of every file below `run`, by relative path (to show that nothing was changed)."""
    return {str(p.relative_to(run)): _digest(p) for p in sorted(run.rglob("*")) if p.is_file()}


def corruption_targets(run: Path) -> list[tuple[Path, str]]:
    """(file, bitflip | truncate): checksummed files get both; structured ones (JSON, pointer) truncation."""
    from parcae.train.checkpoint import CheckpointManager

    latest = CheckpointManager(run).latest()
    assert latest is not None
    checksummed = (
        sorted(latest.iterdir()) + sorted((run / "data").glob("*/*.bin")) + sorted((run / "data").glob("*/docs.npy"))
    )
    structured = [latest.parent / "latest", run / "run_config.json", *sorted((run / "data").glob("*/index.json")),
                  run / "data" / "tokenizer.json"]  # fmt: skip
    return [(p, kind) for p in checksummed for kind in ("bitflip", "truncate")] + [(p, "truncate") for p in structured]


def corrupt(path: Path, kind: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if kind == "bitflip":
        position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
    else:
        data = data[: rng.randrange(max(1, int(0.9 * len(data))))]
    path.write_bytes(bytes(data))


def corruption_sweep(run: Path, work: Path, steps: int, rng: random.Random, rounds: int = 1) -> Counts:
    """Each target corrupted in a copy of `run`: `parcae train --resume` must exit 2 with one line naming the
    problem and leave every file as it was (a bit flip that reads back the same value counts as harmless)."""
    from parcae.cli import main

    counts = Counts()
    for _ in range(rounds):
        for index, (target, kind) in enumerate(corruption_targets(run)):
            copy = work / f"corrupt-{index}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(run, copy)
            victim = copy / target.relative_to(run)
            original = victim.read_bytes()
            corrupt(victim, kind, rng)
            before = file_digests(copy)
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                code = main(["train", "--resume", str(copy), "--steps", str(steps), "--no-progress"])
            message = stderr.getvalue().strip()
            counts.corruptions += 1
            if code == 2 and message.startswith("parcae: error:") and "\n" not in message:
                if "--debug" in message:
                    raise CampaignError(f"{kind} of {target.name} raised an unexpected error: {message}")
                if file_digests(copy) != before:
                    raise CampaignError(f"a failed resume changed files of the run ({kind} of {target.name})")
                counts.corruptions_detected += 1
            elif code == 0 and _reads_the_same(victim, original):
                counts.corruptions_harmless += 1
            else:
                raise CampaignError(f"{kind} of {victim.relative_to(copy)} went undetected (exit {code}: {message!r})")
            shutil.rmtree(copy)
    return counts


def _reads_the_same(path: Path, original: bytes) -> bool:
    """A JSON file whose flipped byte leaves the parsed value equal (e.g. `1e-05` → `1E-05`)."""
    try:
        return json.loads(path.read_bytes()) == json.loads(original)
    except ValueError:
        return False


# ---------------------------------------------------------------------- the campaign
def random_faults(rng: random.Random, n: int) -> list[Fault]:
    faults = []
    for _ in range(n):
        draw = rng.random()
        if draw < 0.5:
            faults.append(Fault("point", point=rng.choice(list(CHECKPOINT_POINTS)), save=rng.randint(1, 3)))
        elif draw < 0.9:
            faults.append(Fault("time", steps=rng.randint(1, 5), delay=rng.uniform(0.0, 0.15)))
        else:
            faults.append(Fault("disk-full"))
    return faults


def campaign(args: argparse.Namespace) -> Counts:
    rng = random.Random(args.seed)
    launcher = Launcher(args.launcher)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="parcae-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / "corpus")
    total = Counts()
    started = time.perf_counter()
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    code = launcher.start(train_argv(corpus, reference, args.steps), Fault(), work / "reference.log").wait(600)
    if code != 0:
        raise CampaignError(f"the uninterrupted run failed (exit {code}); see {work / 'reference.log'}")
    for chain in range(args.chains):
        faults = random_faults(rng, args.faults)
        print(f"chain {chain + 1}/{args.chains}: " + "; ".join(f.describe() for f in faults), flush=True)
        run = work / f"chain-{chain}"
        shutil.rmtree(run, ignore_errors=True)
        counts = run_chain(launcher, corpus, run, faults, args.steps, echo=lambda line: print(line, flush=True))
        counts.chains = 1
        compare(run, reference, counts)
        total.add(counts)
        print(f"  identical to the uninterrupted run ({time.perf_counter() - started:.0f} s so far)", flush=True)
    if args.corruption_rounds:
        total.add(corruption_sweep(reference, work, args.steps, rng, args.corruption_rounds))
    print(f"work directory: {work} ({time.perf_counter() - started:.0f} s)")
    return total


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":  # a training process started by the exec launcher
        fault, limit, argv = Fault(**json.loads(sys.argv[2])), int(sys.argv[3]), sys.argv[4:]
        _child(argv, fault, None, limit)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=6, help="independent runs, each with its own faults")
    parser.add_argument("--faults", type=int, default=8, help="faults per chain (one per process)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument(
        "--launcher", choices=("exec", "fork"), default="exec",
        help="exec: a fresh `python` per process (default); fork: from a forkserver (faster)",
    )  # fmt: skip
    parser.add_argument("--corruption-rounds", type=int, default=2, help="passes of the corruption sweep (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="working directory (default: a new temporary one, kept)")
    counts = campaign(parser.parse_args())
    print(counts.summary())


if __name__ == "__main__":
    main()
