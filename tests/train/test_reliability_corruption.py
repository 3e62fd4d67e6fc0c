"""Corruption: truncated, bit-flipped and wrong-architecture checkpoints, damaged shards and offsets, malformed
jsonl and parquet sources, and tokenizers that do not match are each refused with one clear line (exit 2),
and a refused command changes no file. (`benchmarks/faults.py` sweeps random flips over every file.)"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from parcae import Parcae, get_preset
from parcae.cli import main
from parcae.data.sources import iter_documents
from parcae.data.tokenizer import train_bpe
from parcae.train.checkpoint import CheckpointManager

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from faults import file_digests, train_argv, write_corpus

STEPS = 4  # checkpoints at steps 2 and 4
LATEST, PREVIOUS = "step-00000004", "step-00000002"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs=60)


@pytest.fixture(scope="module")
def finished(corpus: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_argv(corpus, run, STEPS)) == 0
    return run


@pytest.fixture
def run(finished: Path, tmp_path: Path, capsys) -> Path:
    capsys.readouterr()
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def refused(argv: list[str], capsys, changes: Path | None = None) -> str:
    """Run `parcae ARGV`: it must exit 2 with one `parcae: error:` line (no traceback) and change no file."""
    before = file_digests(changes) if changes else None
    code = main(argv)
    out = capsys.readouterr()
    err = out.err.strip()
    assert code == 2 and err.startswith("parcae: error:") and "\n" not in err, (code, out.err)
    assert "--debug" not in err  # a user error, not an unexpected exception
    if changes is not None:
        assert file_digests(changes) == before
    return err


def resume(run: Path, *extra: str) -> list[str]:
    return ["train", "--resume", str(run), "--steps", str(STEPS), "--no-progress", *extra]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def shift_a_boundary(path: Path) -> None:
    """Move one document boundary by a token: still a valid, increasing offset array; only the digest tells."""
    offsets = np.load(path)
    offsets[len(offsets) // 2] += 1
    np.save(path, offsets)


@pytest.mark.parametrize("damage", [truncate, flip], ids=["truncated", "bit-flipped"])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "optimizer.json", "config.json"])
def test_a_damaged_checkpoint_file_is_named_with_the_intact_previous_one(name, damage, run: Path, capsys) -> None:
    damage(run / "checkpoints" / LATEST / name)
    err = refused(resume(run), capsys, changes=run)
    assert f"{LATEST} is corrupt ({name} fails its SHA-256 check)" in err
    assert f"{PREVIOUS} is intact: resume from it with --checkpoint {PREVIOUS}" in err
    err = refused(["eval", str(run), "--batches", "1", "--seeds", "1", "--no-progress"], capsys, changes=run)
    assert f"{name} fails its SHA-256 check" in err
    assert main(resume(run, "--checkpoint", PREVIOUS)) == 0  # the previous checkpoint is still usable


def test_an_edited_trainer_state_is_caught_by_its_own_digest(run: Path, capsys) -> None:
    # Still valid JSON, every other file intact: only the state's own SHA-256 tells.
    path = run / "checkpoints" / LATEST / "trainer_state.json"
    state = json.loads(path.read_text())
    state["progress"]["tokens"] += 1
    path.write_text(json.dumps(state, indent=1))
    assert f"{LATEST} is corrupt (trainer_state.json fails its SHA-256 check)" in refused(resume(run), capsys, run)
    truncate(path)
    assert f"{LATEST} has a corrupt trainer_state.json" in refused(resume(run), capsys, run)


def test_damaged_pointers_and_run_configs_say_what_to_do(run: Path, capsys) -> None:
    pointer = run / "checkpoints" / "latest"
    pointer.write_text("step-0000000\n")
    err = refused(resume(run), capsys, run)
    assert "naming 'step-0000000', which does not exist" in err and f"--checkpoint {LATEST}" in err
    pointer.unlink()
    assert (
        f"no checkpoint pointer (checkpoints/latest is missing); the newest intact checkpoint is {LATEST}"
        in refused(resume(run), capsys, run)
    )
    truncate(run / "run_config.json")
    assert "run_config.json is not a valid run configuration" in refused(resume(run), capsys, run)


def test_a_checkpoint_of_another_architecture_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    other = Parcae(get_preset("parcae-micro", d_model=32, n_heads=1, d_state=32))
    manager = CheckpointManager(run)
    state = manager.verify(run / "checkpoints" / LATEST)
    manager.save(6, other, {"state": {}, "param_groups": []}, {k: v for k, v in state.items() if k != "manifest"})
    err = refused(["train", "--resume", str(run), "--steps", "8"], capsys, run)
    assert "weights do not match the parcae-micro config" in err and "wrong shape" in err
    # A save_pretrained directory whose config does not describe its weights.
    model_dir = tmp_path / "model"
    other.save_pretrained(model_dir)
    shutil.copy(run / "tokenizer.json", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "d_model": 64, "n_heads": 2, "d_state": 64}))
    err = refused(["eval", str(model_dir), "--data", str(run / "data"), "--batches", "1"], capsys, model_dir)
    assert "weights do not match" in err


@pytest.mark.parametrize(
    ("damage", "split", "file", "message"),
    [
        (truncate, "train", "shard-00000.bin", "is truncated"),
        (flip, "train", "shard-00000.bin", "fails its sha256 check"),
        (flip, "val", "shard-00000.bin", "fails its sha256 check"),
        (shift_a_boundary, "train", "docs.npy", "docs.npy fails its sha256 check"),
        (truncate, "train", "docs.npy", "docs.npy is corrupt"),
        (truncate, "val", "index.json", "index.json is not valid JSON"),
    ],
    ids=["shard-truncated", "shard-flipped", "val-shard-flipped", "offsets-flipped", "offsets-truncated", "index"],
)
def test_damaged_token_data_is_refused_before_training(damage, split, file, message, run: Path, capsys) -> None:
    damage(run / "data" / split / file)
    assert message in refused(resume(run), capsys, run)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "cut\n', "bad.jsonl line 2 is not valid JSON"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "bad.jsonl line 2 is not valid UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "bad.jsonl line 2 has no field 'text'"),
        ("bad.jsonl", b'{"text": 3}\n', "bad.jsonl line 1: field 'text' is int, not a string"),
        ("bad.parquet", b"PAR1 not really a parquet file", "bad.parquet is not a readable Parquet file"),
    ],
    ids=["json", "utf-8", "field", "type", "parquet-garbage"],
)
def test_malformed_sources_are_named_and_leave_nothing_behind(name, content, message, tmp_path: Path, capsys):
    source = tmp_path / name
    source.write_bytes(content)
    out = tmp_path / "run"
    assert message in refused(train_argv(source, out, 1), capsys)
    assert source.read_bytes() == content and not out.exists()  # the failed start removed what it created
    source.write_text('{"text": "a valid document"}\n' * 40 if name.endswith(".jsonl") else "")
    if name.endswith(".jsonl"):
        assert main(train_argv(source, out, 1)) == 0  # the same command works once the file is fixed


def test_damaged_parquet_is_named_with_file_and_row(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": [f"document {i} " * 40 for i in range(100)]})
    pq.write_table(table, tmp_path / "ok.parquet", row_group_size=25, write_page_checksum=True)
    data = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.parquet is not a readable Parquet file"):
        list(iter_documents(str(tmp_path / "cut.parquet"), "all"))
    # A flipped bit inside a data page: caught by the page CRC, which pyarrow only checks when asked to.
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x04
    (tmp_path / "flip.parquet").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"flip\.parquet (is corrupt after row \d+|is not a readable)"):
        list(iter_documents(str(tmp_path / "flip.parquet"), "all"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "column.parquet")
    with pytest.raises(ValueError, match=r"column\.parquet has no column 'text'"):
        list(iter_documents(str(tmp_path / "column.parquet"), "all"))


def test_tokenizers_that_do_not_match_are_refused(corpus: Path, run: Path, tmp_path: Path, capsys) -> None:
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    big, small = train_bpe(texts, 400), train_bpe(texts, 300)
    assert big.vocab_size > 320 >= small.vocab_size > 259  # parcae-micro's vocab_size, the byte tokenizer's
    big.save(tmp_path / "big")
    small.save(tmp_path / "small")
    argv = train_argv(corpus, tmp_path / "new", 1)
    # vocab_size follows the tokenizer unless given; one given smaller than the tokenizer is refused
    too_small = [*argv, "--tokenizer", str(tmp_path / "big"), "--set", "vocab_size=320"]
    assert "is smaller than the tokenizer's" in refused(too_small, capsys)
    data = run / "data"  # a prepared directory (byte tokenizer)
    argv = train_argv(data, tmp_path / "new", 1)
    assert "differs from the one" in refused([*argv, "--tokenizer", str(tmp_path / "small")], capsys, data)
    shutil.copy(tmp_path / "small" / "tokenizer.json", data / "tokenizer.json")  # swapped behind the data's back
    assert "was tokenized with another tokenizer" in refused(argv, capsys, data)
    # A run whose tokenizer.json no longer fits its model, or is damaged: eval and generate refuse it.
    shutil.copy(tmp_path / "big" / "tokenizer.json", run / "tokenizer.json")
    assert "does not fit the model" in refused(["eval", str(run), "--batches", "1"], capsys, run)
    truncate(run / "tokenizer.json")
    assert "is not a valid tokenizer.json" in refused(["generate", str(run), "--prompt", "def "], capsys, run)
