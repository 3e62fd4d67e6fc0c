from __future__ import annotations

import itertools
import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from parcae.data.sources import (
    LONG_DOC_CHARS,
    PIECE_CHARS,
    Document,
    SourceSpec,
    cut_text,
    fallback_key,
    iter_documents,
    parse_spec,
    split_of,
    stdlib_summary,
)


def write_jsonl(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- stdlib
def test_stdlib_is_deterministic_and_sorted() -> None:
    first = list(itertools.islice(iter_documents("stdlib", "all"), 40))
    again = list(itertools.islice(iter_documents("stdlib", "all"), 40))
    assert first == again
    ids = [d.id for d in first]
    files = [i.partition("#")[0] for i in ids]  # a file over LONG_DOC_CHARS comes as pieces FILE#0, FILE#1, …
    assert files == sorted(files) and len(set(ids)) == 40
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)
    assert all(isinstance(d, Document) and d.text for d in first)


def test_stdlib_split_is_disjoint_and_covers_everything() -> None:
    train = {d.id for d in iter_documents("stdlib", "train", val_fraction=0.05)}
    val = {d.id for d in iter_documents("stdlib", "val", val_fraction=0.05)}
    assert not train & val
    assert train | val == {d.id for d in iter_documents("stdlib", "all")}
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.1
    summary = stdlib_summary()
    files = {i.partition("#")[0] for i in train | val}  # files over LONG_DOC_CHARS come as pieces FILE#k
    assert summary["files"] == len(files) > 100 and summary["bytes"] > 1_000_000
    assert len(train | val) > len(files)


def test_split_assignment_is_stable() -> None:
    # Pinned: a changed hash would silently move documents between train and val.
    assert [split_of(i, 0.5) for i in ("os.py", "json/__init__.py", "a", "b")] == ["train", "val", "val", "train"]
    assert split_of("anything", 0.0) == "train" and split_of("anything", 1.0) == "val"
    # A larger val_fraction only moves documents from train into val.
    ids = [f"doc{i}" for i in range(2000)]
    small = {i for i in ids if split_of(i, 0.01) == "val"}
    large = {i for i in ids if split_of(i, 0.2) == "val"}
    assert small <= large and 5 <= len(small) < 60 and 300 < len(large) < 500
    assert split_of("a", 0.0, forced_val={"a"}) == "val" and split_of("b", 0.0, forced_val={"a"}) == "train"
    assert sorted(ids, key=fallback_key)[0] == min(reversed(ids), key=fallback_key)  # order plays no part


# ---------------------------------------------------------------------------------------------- pieces
def test_cut_text_reassembles_and_cuts_at_line_ends() -> None:
    lines = [f"line {i} " + "x" * (i % 97) + "\n" for i in range(3000)]
    text = "".join(lines)
    pieces = list(cut_text(text))
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(PIECE_CHARS // 2 < len(p) <= PIECE_CHARS and p.endswith("\n") for p in pieces[:-1])
    flat = "y" * (3 * PIECE_CHARS + 5)  # no newline: cut at the window's end
    assert [len(p) for p in cut_text(flat)] == [PIECE_CHARS, PIECE_CHARS, PIECE_CHARS, 5]
    # A newline only in the first half of the window does not count.
    early = "a" * 10 + "\n" + "b" * (2 * PIECE_CHARS)
    assert len(next(cut_text(early))) == PIECE_CHARS
    assert list(cut_text("")) == [""] and list(cut_text("short")) == ["short"]


def test_long_documents_come_as_pieces(tmp_path) -> None:
    long_text = "".join(f"sentence {i} of a long book.\n" for i in range(LONG_DOC_CHARS // 20))
    assert len(long_text) > LONG_DOC_CHARS
    (tmp_path / "book.txt").write_text(long_text, encoding="utf-8")
    (tmp_path / "edge.txt").write_text("e" * LONG_DOC_CHARS, encoding="utf-8")  # not longer: kept whole
    write_jsonl(tmp_path / "rows.jsonl", [{"text": "short"}, {"text": long_text}])
    docs = list(iter_documents(str(tmp_path), "all"))
    book = [d for d in docs if d.id.startswith("book.txt")]
    assert [d.id for d in book] == [f"book.txt#{k}" for k in range(len(book))] and len(book) > 8
    assert "".join(d.text for d in book) == long_text
    assert [d.id for d in docs if not d.id.startswith("book.txt")][:3] == ["edge.txt", "rows.jsonl:1", "rows.jsonl:2#0"]
    # The split is per piece: a long document has pieces on both sides.
    val = {d.id for d in iter_documents(str(tmp_path), "val", val_fraction=0.2)}
    assert val and {d.id for d in book} - val


# ---------------------------------------------------------------------------------------------- files
def test_txt_file_and_directory(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first ✓", encoding="utf-8")
    (tmp_path / "notes.csv").write_text("ignored in a directory")
    docs = list(iter_documents(str(tmp_path), "all"))
    assert docs == [Document("a.txt", "first ✓"), Document("b/two.txt", "second")]
    assert list(iter_documents(str(tmp_path / "a.txt"), "all")) == [Document("a.txt", "first ✓")]


def test_jsonl(tmp_path) -> None:
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"text": "one"}, {"body": "x", "text": "two"}, {"text": None}, {"text": "four"}])
    with path.open("a") as f:
        f.write("\n")  # blank lines are skipped
    docs = list(iter_documents(str(path), "all"))
    assert docs == [Document("data.jsonl:1", "one"), Document("data.jsonl:2", "two"), Document("data.jsonl:4", "four")]


def test_jsonl_custom_field(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"body": "x"}, {"body": "y"}])
    assert [d.text for d in iter_documents(str(path), "all", text_field="body")] == ["x", "y"]


@pytest.mark.parametrize(
    ("line", "message"),
    [("{oops", r"line 3 is not valid JSON"), ('{"title": "t"}', r"line 3 has no field 'text'"), ("[1]", "line 3")],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        list(iter_documents(str(path), "all"))
    assert "bad.jsonl" in str(info.value)


def test_non_string_text_field(tmp_path) -> None:
    path = tmp_path / "n.jsonl"
    write_jsonl(path, [{"text": 3}])
    with pytest.raises(ValueError, match="line 1: field 'text' is int"):
        list(iter_documents(str(path), "all"))


def test_parquet_streams_row_groups(tmp_path) -> None:
    path = tmp_path / "sub" / "p.parquet"
    path.parent.mkdir()
    texts = [f"row {i}" for i in range(7)]
    pq.write_table(pa.table({"text": texts, "n": list(range(7))}), path, row_group_size=2)
    docs = list(iter_documents(str(path), "all"))
    assert docs == [Document(f"p.parquet:{i}", t) for i, t in enumerate(texts)]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_documents(str(path), "all", text_field="body"))
    # In a directory: sorted with the other files, ids relative to the directory.
    write_jsonl(tmp_path / "a.jsonl", [{"text": "j"}])
    ids = [d.id for d in iter_documents(str(tmp_path), "all")]
    assert ids == ["a.jsonl:1", *(f"sub/p.parquet:{i}" for i in range(7))]


def test_sources_that_match_nothing(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        iter_documents(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        iter_documents(str(tmp_path / "empty"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="Unsupported data file"):
        iter_documents(str(tmp_path / "data.csv"))
    write_jsonl(tmp_path / "one.jsonl", [{"text": "only"}])
    with pytest.raises(ValueError, match="no documents in split 'val'"):
        list(iter_documents(str(tmp_path / "one.jsonl"), "val", val_fraction=0.0))
    with pytest.raises(ValueError, match="Unknown split"):
        iter_documents("stdlib", "test")
    with pytest.raises(ValueError, match="empty"):
        iter_documents("  ")


# ---------------------------------------------------------------------------------------------- HF
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("stdlib", SourceSpec("stdlib")),
        ("hf:roneneldan/TinyStories", SourceSpec("hf", name="roneneldan/TinyStories")),
        (
            "hf:HuggingFaceFW/fineweb-edu:sample-10BT",
            SourceSpec("hf", name="HuggingFaceFW/fineweb-edu", config="sample-10BT"),
        ),
        (
            "hf:wikitext:wikitext-2-raw-v1@validation",
            SourceSpec("hf", name="wikitext", config="wikitext-2-raw-v1", hf_split="validation"),
        ),
        ("hf:json@train", SourceSpec("hf", name="json", hf_split="train")),
    ],
)
def test_parse_spec(spec: str, expected: SourceSpec) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["hf:", "hf:name:", "hf:name@", "hf::cfg"])
def test_malformed_hf_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="Malformed Hugging Face spec"):
        parse_spec(spec)


def test_hf_spec_iterates_load_dataset(monkeypatch) -> None:
    calls = []

    def load_dataset(name, config, *, split, streaming, **kwargs):
        calls.append((name, config, split, streaming, kwargs))
        return iter([{"text": f"doc {i}", "meta": i} for i in range(5)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = list(iter_documents("hf:org/set:cfg@validation", "all", load_kwargs={"revision": "main"}))
    assert calls == [("org/set", "cfg", "validation", True, {"revision": "main"})]
    assert docs == [Document(f"org/set:{i}", f"doc {i}") for i in range(5)]
    with pytest.raises(ValueError, match="record 0 has no field 'body'"):
        list(iter_documents("hf:org/set", "all", text_field="body"))


def test_hf_without_datasets_installed(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install parcae-looped\[hf\]"):
        list(iter_documents("hf:org/set", "all"))


def test_hf_json_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "local.jsonl"
    write_jsonl(data, [{"text": f"local {i}"} for i in range(30)])
    kwargs = {"data_files": str(data), "cache_dir": str(tmp_path / "cache")}
    docs = list(iter_documents("hf:json@train", "all", load_kwargs=kwargs))
    assert docs == [Document(f"json:{i}", f"local {i}") for i in range(30)]
    val = list(iter_documents("hf:json@train", "val", val_fraction=0.3, load_kwargs=kwargs))
    assert 0 < len(val) < 30 and all(split_of(d.id, 0.3) == "val" for d in val)
