"""Resource faults: a checkpoint writer that fails midway (disk full) leaves the earlier checkpoints and
`latest` untouched, the trainer warns and retries at the next interval, and stops with one clear line after
3 failures in a row; a run directory that holds another run (or files a run would write) is refused unless
`--overwrite`, which renames the old run aside and never deletes it."""

from __future__ import annotations

import errno
import itertools
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import save as serialize

from parcae.cli import main
from parcae.data.shards import prepare
from parcae.data.tokenizer import ByteTokenizer
from parcae.train import checkpoint
from parcae.train.checkpoint import CheckpointManager

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from faults import check_checkpoints, file_digests, train_argv, write_corpus

FULL = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resources")
    prepare(str(write_corpus(root / "corpus", docs=60)), ByteTokenizer(), root / "data", progress=False)
    return root / "data"


def failing_safetensors(monkeypatch, failing: Callable[[int], bool]) -> None:
    """The optimizer's safetensors writer fails on the calls `failing(n)` picks, after writing half the file."""
    real, calls = checkpoint.save_file, itertools.count(1)

    def save_file(tensors, filename, *args, **kwargs):
        if failing(next(calls)):
            data = serialize(tensors)
            Path(filename).write_bytes(data[: len(data) // 2])
            raise FULL
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


def failing_write_text(monkeypatch, failing: Callable[[int], bool]) -> None:
    """`Path.write_text` of optimizer.json fails on the calls `failing(n)` picks, after writing half the text."""
    real, calls = Path.write_text, itertools.count(1)

    def write_text(self, text, *args, **kwargs):
        if self.name == "optimizer.json" and failing(next(calls)):
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise FULL
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def events(run: Path, kind: str) -> list[int]:
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["step"] for e in entries if e.get("event") == kind]


@pytest.mark.parametrize("writer", [failing_safetensors, failing_write_text], ids=["safetensors", "write_text"])
def test_a_failed_checkpoint_write_is_reported_and_training_goes_on(writer, data, tmp_path, monkeypatch, capsys):
    writer(monkeypatch, lambda n: n == 2)  # the checkpoint at step 4
    run = tmp_path / "run"
    assert main(train_argv(data, run, 8)) == 0
    out = capsys.readouterr().out
    assert "warning: could not write checkpoint step-00000004" in out and "No space left on device" in out
    assert "step-00000002 is intact and still the latest" in out and "tried at step 6" in out
    assert events(run, "checkpoint_failed") == [4] and events(run, "checkpoint") == [2, 6, 8]
    assert [p.name for p in CheckpointManager(run).list()] == ["step-00000002", "step-00000006", "step-00000008"]
    assert not list((run / "checkpoints").glob(".*"))  # no partial temp directory left behind
    assert check_checkpoints(run) == 3


def test_a_disk_that_stays_full_stops_the_run_with_the_intact_checkpoint_named(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    failing_safetensors(monkeypatch, lambda n: n >= 2)  # every checkpoint from step 4 on
    code = main(train_argv(data, run, 12))
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("parcae: error:") and "\n" not in err
    assert "could not write checkpoint step-00000008" in err and "3 checkpoint writes failed in a row" in err
    assert f"--resume {run} continues from step-00000002" in err
    assert CheckpointManager(run).latest().name == "step-00000002" and check_checkpoints(run) == 1
    assert events(run, "checkpoint_failed") == [4, 6, 8]
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # space is back: the run completes
    assert CheckpointManager(run).latest().name == "step-00000012"


def test_a_run_directory_is_only_replaced_with_overwrite_and_never_deleted(data: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    argv = train_argv(data, run, 1)
    assert main(argv) == 0
    original = file_digests(run)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and file_digests(run) == original
    for k in (1, 2):
        assert main([*argv, "--overwrite"]) == 0
        assert f"moved the previous run in {run} to {run.with_name(f'run.old-{k}')}" in capsys.readouterr().out
    assert file_digests(tmp_path / "run.old-1") == original
    assert (run / "run_config.json").is_file() and (tmp_path / "run.old-2" / "run_config.json").is_file()
    assert main(["train", "--resume", str(run), "--overwrite"]) == 2
    assert "cannot be combined with --resume" in capsys.readouterr().err
    # A new run that fails to start puts the run it moved aside back.
    before = file_digests(run)
    assert main([*train_argv(tmp_path / "missing.jsonl", run, 1), "--overwrite"]) == 2
    assert file_digests(run) == before and not (tmp_path / "run.old-3").exists()


def test_a_directory_with_files_a_run_would_write_is_refused(data: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokenizer.json").write_text("my own tokenizer")
    (mine / "notes.md").write_text("my notes")
    assert main(train_argv(data, mine, 1)) == 2
    assert "holds no run but has tokenizer.json, which a run would overwrite" in capsys.readouterr().err
    assert main([*train_argv(data, mine, 1), "--overwrite"]) == 2  # --overwrite replaces runs only
    assert (mine / "tokenizer.json").read_text() == "my own tokenizer"
    (mine / "tokenizer.json").unlink()
    assert main(train_argv(tmp_path / "missing.jsonl", mine, 1)) == 2  # a failed start removes only its own files
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md"]
    assert main(train_argv(data, mine, 1)) == 0  # unrelated files are fine, and left alone
    assert (mine / "notes.md").read_text() == "my notes"
    shutil.rmtree(mine)
