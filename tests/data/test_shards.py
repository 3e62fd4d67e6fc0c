from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from parcae.cli import main
from parcae.data.shards import MemoryStore, ShardStore, TokenStore, is_prepared, prepare, val_split_note
from parcae.data.sources import Document, fallback_key, iter_documents, split_of
from parcae.data.tokenizer import ByteTokenizer, load_tokenizer


def make_corpus(root, n: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"text": "".join(rng.choice("abcdé ✓\n") for _ in range(rng.randint(0, 80)))}) for _ in range(n)
    ]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "long.txt").write_text("x" * 300, encoding="utf-8")  # longer than a shard below
    return str(root)


def expected_docs(spec: str, split: str, tok, val_fraction: float, forced_val=()) -> list[list[int]]:
    docs = iter_documents(spec, split, val_fraction=val_fraction, forced_val=forced_val)
    return [[tok.bos_id, *tok.encode(d.text)] for d in docs]


def book(n_lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(f"{i}: " + "word " * rng.randint(0, 30) + "\n" for i in range(n_lines))


class BigVocabTokenizer(ByteTokenizer):
    """Byte tokenizer shifted above 65535, to force uint32 shards."""

    @property
    def vocab_size(self) -> int:
        return 70_000

    @property
    def bos_id(self) -> int:
        return 69_999

    def encode(self, text: str) -> list[int]:
        return [66_000 + b for b in super().encode(text)]


def test_prepare_round_trips_documents(tmp_path) -> None:
    spec, tok = make_corpus(tmp_path / "src"), ByteTokenizer()
    out = tmp_path / "prepared"
    summary = prepare(spec, tok, out, val_fraction=0.3, shard_tokens=200, progress=False)
    assert is_prepared(out) and summary["dtype"] == "uint16" and summary["tokenizer"] == "byte"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    assert isinstance(load_tokenizer(out), ByteTokenizer)
    for split in ("train", "val"):
        store = ShardStore.open(out, split)
        assert isinstance(store, TokenStore)
        want = expected_docs(spec, split, tok, 0.3)
        assert store.num_docs == len(want) == summary["splits"][split]["num_docs"] > 0
        assert store.num_tokens == sum(map(len, want)) == summary["splits"][split]["num_tokens"]
        assert [store.doc(i).tolist() for i in range(store.num_docs)] == want
        assert store.doc_lengths.tolist() == [len(d) for d in want]
        assert store.doc(0).dtype == np.uint16 and not store.doc(0).flags.owndata  # a view into the memory map
        store.verify()
        index = json.loads((out / split / "index.json").read_text())
        assert index["vocab_size"] == 259 and index["spec"] == spec and index["bos_id"] == 256
        for shard in index["shards"]:
            path = out / split / shard["file"]
            assert path.stat().st_size == 2 * shard["num_tokens"]
            assert shard["num_tokens"] <= 200 or shard["num_tokens"] == 301  # only the long document overflows
    assert len(json.loads((out / "train" / "index.json").read_text())["shards"]) > 2
    with pytest.raises(IndexError):
        ShardStore.open(out, "train").doc(10_000)


def test_memory_store_matches_shards(tmp_path) -> None:
    spec, tok = make_corpus(tmp_path / "src"), ByteTokenizer()
    prepare(spec, tok, tmp_path / "p", val_fraction=0.0, shard_tokens=128, progress=False)
    shards = ShardStore.open(tmp_path / "p", "train")
    memory = MemoryStore.from_documents(iter_documents(spec, "all"), tok, batch_docs=7)
    assert memory.num_docs == shards.num_docs and memory.num_tokens == shards.num_tokens
    assert all(np.array_equal(memory.doc(i), shards.doc(i)) for i in range(memory.num_docs))
    assert np.shares_memory(memory.doc(1), memory.tokens)  # a view, not a copy
    assert ShardStore.open(tmp_path / "p", "val").num_docs == 0  # an empty split is valid


def test_uint32_for_large_vocabularies(tmp_path) -> None:
    spec, tok = make_corpus(tmp_path / "src", n=10), BigVocabTokenizer()
    summary = prepare(spec, tok, tmp_path / "p", val_fraction=0.0, progress=False)
    assert summary["dtype"] == "uint32"
    store = ShardStore.open(tmp_path / "p", "train")
    assert store.dtype == np.uint32
    assert [store.doc(i).tolist() for i in range(store.num_docs)] == expected_docs(spec, "all", tok, 0.0)


def test_truncated_shard_fails_at_open(tmp_path) -> None:
    prepare(make_corpus(tmp_path / "src"), ByteTokenizer(), tmp_path / "p", val_fraction=0.0, progress=False)
    shard = tmp_path / "p" / "train" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        ShardStore.open(tmp_path / "p", "train")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="Missing shard"):
        ShardStore.open(tmp_path / "p", "train")
    with pytest.raises(FileNotFoundError, match="run prepare"):
        ShardStore.open(tmp_path / "nowhere", "train")


def test_verify_detects_corruption(tmp_path) -> None:
    prepare(make_corpus(tmp_path / "src"), ByteTokenizer(), tmp_path / "p", val_fraction=0.0, progress=False)
    shard = tmp_path / "p" / "train" / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x01
    shard.write_bytes(bytes(data))
    store = ShardStore.open(tmp_path / "p", "train")  # sizes still match: open does not hash
    with pytest.raises(ValueError, match="sha256"):
        store.verify()


def test_prepare_refuses_to_overwrite(tmp_path) -> None:
    spec, tok = make_corpus(tmp_path / "src"), ByteTokenizer()
    out = tmp_path / "p"
    prepare(spec, tok, out, progress=False)
    with pytest.raises(FileExistsError, match="already holds a prepared dataset"):
        prepare(spec, tok, out, progress=False)
    summary = prepare(spec, tok, out, progress=False, overwrite=True, max_tokens=100)
    total = sum(split["num_tokens"] for split in summary["splits"].values())
    assert summary["truncated"] and 100 <= total < 500
    assert ShardStore.open(out, "train").num_tokens + ShardStore.open(out, "val").num_tokens == total
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare(spec, tok, other, progress=False)
    assert (other / "keep.txt").read_text() == "precious"


def test_crash_leaves_nothing_that_looks_prepared(tmp_path) -> None:
    class Exploding(ByteTokenizer):
        calls = 0

        def encode_batch(self, texts):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("boom")
            return super().encode_batch(texts)

    spec = make_corpus(tmp_path / "src", n=2000)
    with pytest.raises(RuntimeError, match="boom"):
        prepare(spec, Exploding(), tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists() and not is_prepared(tmp_path / "p")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prepare_stdlib_with_token_cap(tmp_path) -> None:
    summary = prepare("stdlib", ByteTokenizer(), tmp_path / "p", max_tokens=50_000, progress=True)
    total = summary["splits"]["train"]["num_tokens"] + summary["splits"]["val"]["num_tokens"]
    assert summary["truncated"] and total >= 50_000
    store = ShardStore.open(tmp_path / "p", "train")
    first = next(iter_documents("stdlib", "train"))
    assert store.doc(0).tolist() == [256, *ByteTokenizer().encode(first.text)]


def test_prepare_errors_on_empty_source(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        prepare(str(tmp_path / "empty"), ByteTokenizer(), tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------------------------- val split
def test_single_long_text_gets_a_val_split(tmp_path) -> None:
    text = book(12_000)  # ~1 MB: one document, cut into pieces
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    spec, tok = str(tmp_path / "book.txt"), ByteTokenizer()
    pieces = list(iter_documents(spec, "all"))
    assert "".join(p.text for p in pieces) == text and len(pieces) > 100
    first = prepare(spec, tok, tmp_path / "a", val_fraction=0.1, progress=False)
    again = prepare(spec, tok, tmp_path / "b", val_fraction=0.1, progress=False)
    val, train = first["splits"]["val"], first["splits"]["train"]
    assert first["splits"] == again["splits"] and val["num_docs"] > 0
    assert 0.05 < val["num_tokens"] / (val["num_tokens"] + train["num_tokens"]) < 0.2
    for split in ("train", "val"):  # the same pieces on the same side, byte for byte
        index_a, index_b = (json.loads((tmp_path / d / split / "index.json").read_text()) for d in "ab")
        assert index_a["shards"] == index_b["shards"] and index_a["offsets_sha256"] == index_b["offsets_sha256"]
        store = ShardStore.open(tmp_path / "a", split)
        assert [store.doc(i).tolist() for i in range(store.num_docs)] == expected_docs(spec, split, tok, 0.1)
    assert first["val_fallback"] == [] and val_split_note(tmp_path / "a") is None


def test_few_documents_hold_one_out_whatever_the_order(tmp_path, capsys) -> None:
    # Three documents that all hash into train at 5 %: the fallback must hold one out.
    names = [n for n in (f"doc{i}.txt" for i in range(50)) if split_of(n, 0.05) == "train"][:3]
    expected = min(names, key=fallback_key)
    for corpus, order in (("one", names), ("two", names[::-1])):
        (tmp_path / corpus).mkdir()
        for name in order:
            (tmp_path / corpus / name).write_text(f"the text of {name}\n", encoding="utf-8")
    tok = ByteTokenizer()
    first = prepare(str(tmp_path / "one"), tok, tmp_path / "p1", val_fraction=0.05, progress=True)
    assert f"{expected!r} is held out" in capsys.readouterr().err
    second = prepare(str(tmp_path / "two"), tok, tmp_path / "p2", val_fraction=0.05, progress=False)
    assert first["val_fallback"] == second["val_fallback"] == [expected]
    assert json.loads((tmp_path / "p1" / "dataset.json").read_text())["val_fallback"] == [expected]
    val, train = ShardStore.open(tmp_path / "p1", "val"), ShardStore.open(tmp_path / "p1", "train")
    assert val.num_docs == 1 and train.num_docs == 2
    assert tok.decode(val.doc(0)) == f"the text of {expected}\n"
    # iter_documents reproduces the prepared split when given the recorded fallback.
    spec = str(tmp_path / "one")
    forced = first["val_fallback"]
    assert list(iter_documents(spec, "val", val_fraction=0.05, forced_val=forced)) == [
        Document(expected, f"the text of {expected}\n")
    ]
    assert [train.doc(i).tolist() for i in range(2)] == expected_docs(spec, "train", tok, 0.05, forced)
    assert val_split_note(tmp_path / "p1") is None


def test_empty_val_split_says_why(tmp_path, capsys) -> None:
    path = tmp_path / "note.txt"
    assert split_of("note.txt", 0.01) == "train"  # the CLI's default val_fraction
    path.write_text("just one short note\n", encoding="utf-8")
    assert main(["data", "prepare", str(path), "--out", str(tmp_path / "p")]) == 0
    note = val_split_note(tmp_path / "p")
    assert note is not None and "\n" not in note
    assert "single document of 21 tokens" in note and "`parcae eval RUN --data SPEC`" in note
    assert f"warning: {note}" in capsys.readouterr().err

    spec = make_corpus(tmp_path / "src")
    prepare(spec, ByteTokenizer(), tmp_path / "zero", val_fraction=0.0, progress=False)
    assert "val_fraction is 0" in val_split_note(tmp_path / "zero")
    # A directory prepared before the fallback existed: several pieces, none held out.
    dataset = tmp_path / "zero" / "dataset.json"
    dataset.write_text(json.dumps({**json.loads(dataset.read_text()), "val_fraction": 0.01}))
    assert "none of its 61 pieces fell into it" in val_split_note(tmp_path / "zero")
    shutil.rmtree(tmp_path / "zero" / "val")
    assert "has no validation split" in val_split_note(tmp_path / "zero")
