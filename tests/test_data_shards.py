from __future__ import annotations

import json
import random

import numpy as np
import pytest

from parcae.data.shards import MemoryStore, ShardStore, TokenStore, is_prepared, prepare
from parcae.data.sources import iter_documents
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


def expected_docs(spec: str, split: str, tok, val_fraction: float) -> list[list[int]]:
    return [[tok.bos_id, *tok.encode(d.text)] for d in iter_documents(spec, split, val_fraction=val_fraction)]


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
