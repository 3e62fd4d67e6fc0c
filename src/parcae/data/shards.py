"""Tokenize a corpus once into memory-mapped shards, and read tokens back as per-document arrays. Layout: dataset.json
(summary, written last), tokenizer.json, {train,val}/ with shard-NNNNN.bin (little-endian uint16 tokens, uint32 above
65536 ids), docs.npy (int64 [num_docs + 1] document starts, then the end) and index.json (dtype, counts, sha256 of each
file). A document is [BOS] + encode(text) and never straddles two shards."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import secrets
import shutil
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import numpy as np

from .sources import Document, fallback_key, iter_documents, one_line, split_of
from .tokenizer import Tokenizer, get_tokenizer

FORMAT, FORMAT_VERSION = "parcae-shards", 1
DATASET_FILE, INDEX_FILE, OFFSETS_FILE = "dataset.json", "index.json", "docs.npy"
SPLIT_DIRS = ("train", "val")
_ENCODE_CHUNK_DOCS = 128  # of at most LONG_DOC_CHARS each: at most 8 M characters per encode_batch
_HASH_CHUNK_BYTES = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned little-endian dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@runtime_checkable
class TokenStore(Protocol):
    """Documents as token arrays, each opening with BOS."""

    num_docs: int
    num_tokens: int
    dtype: np.dtype
    doc_lengths: np.ndarray  # int64 [num_docs]: tokens per document (without reading any token)

    def doc(self, i: int) -> np.ndarray: ...  # tokens of document `i` (a view, not a copy)


def _check_offsets(offsets: np.ndarray, num_tokens: int, where: str) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != num_tokens:
        raise ValueError(f"{where}: document offsets must run from 0 to {num_tokens}.")
    if np.any(np.diff(offsets) < 0):
        raise ValueError(f"{where}: document offsets must be non-decreasing.")
    return offsets


class MemoryStore:
    """Documents held in one in-memory token array (small corpora such as the stdlib, and tests)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray) -> None:
        self.tokens = np.asarray(tokens)
        if self.tokens.ndim != 1:
            raise ValueError("MemoryStore tokens must be one-dimensional.")
        self.offsets = _check_offsets(offsets, self.tokens.size, "MemoryStore")
        self.doc_lengths = np.diff(self.offsets)
        self.num_docs, self.num_tokens, self.dtype = self.offsets.size - 1, int(self.tokens.size), self.tokens.dtype

    @classmethod
    def from_token_lists(cls, docs: Iterable[Iterable[int]], dtype: Any = np.int64) -> MemoryStore:
        """A store holding exactly `docs` (no BOS is added)."""
        arrays = [np.asarray(d if isinstance(d, np.ndarray) else list(d), dtype=dtype) for d in docs]
        offsets = np.cumsum([0, *(a.size for a in arrays)], dtype=np.int64)
        return cls(np.concatenate([np.zeros(0, dtype=dtype), *arrays]), offsets)

    @classmethod
    def from_documents(
        cls, docs: Iterable[Document | str], tokenizer: Tokenizer, *, batch_docs: int = 256
    ) -> MemoryStore:
        """Tokenize `docs` in memory, each stored as [BOS] + encode(text)."""
        dtype = token_dtype(tokenizer.vocab_size)
        texts = (d.text if isinstance(d, Document) else d for d in docs)
        arrays: list[np.ndarray] = []
        while batch := list(itertools.islice(texts, batch_docs)):  # converted per batch: no corpus-sized int lists
            arrays.extend(np.array([tokenizer.bos_id, *ids], dtype=dtype) for ids in tokenizer.encode_batch(batch))
        return cls.from_token_lists(arrays, dtype=dtype)

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"Document {i} out of range for a store of {self.num_docs}.")
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __repr__(self) -> str:
        return f"MemoryStore(num_docs={self.num_docs}, num_tokens={self.num_tokens})"


class ShardStore:
    """One split of a prepared directory, memory-mapped. Open with `ShardStore.open(directory, split)`."""

    def __init__(self, directory: Path, index: dict[str, Any], offsets: np.ndarray, maps: list[np.ndarray]) -> None:
        self.directory, self.index, self.offsets, self.doc_lengths = directory, index, offsets, np.diff(offsets)
        self.num_docs, self.num_tokens = offsets.size - 1, int(offsets[-1])
        self.dtype, self._maps = np.dtype(index["dtype"]), maps
        self._shard_starts = np.cumsum([0, *(s["num_tokens"] for s in index["shards"])], dtype=np.int64)
        # Shard of each document: the last shard starting at or before the document's start.
        self._doc_shard = np.searchsorted(self._shard_starts[:-1], offsets[:-1], side="right") - 1
        if self.num_docs and not np.all(offsets[1:] <= self._shard_starts[self._doc_shard + 1]):
            raise ValueError(f"{directory}: a document straddles two shards; the index is corrupt.")

    @classmethod
    def open(cls, directory: str | Path, split: str = "train") -> ShardStore:
        """Open `directory/split`, checking the index and every shard's size (not its checksum; see `verify`)."""
        split_dir = Path(directory) / split
        index_path = split_dir / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"No prepared split at {split_dir} (missing {INDEX_FILE}); run prepare first.")
        index = _read_json(index_path)
        if (index.get("format"), index.get("version")) != (FORMAT, FORMAT_VERSION):
            raise ValueError(f"{index_path} is not a {FORMAT} index of version {FORMAT_VERSION}.")
        try:  # a field missing or of the wrong type is damage: KeyError, TypeError, AttributeError below
            dtype = np.dtype(index["dtype"]).newbyteorder("<")
            if dtype.kind != "u" or dtype.itemsize not in (2, 4):
                raise ValueError(f"{index_path}: unsupported token dtype {index['dtype']!r}.")
            num_tokens = int(index["num_tokens"])
            if sum(s["num_tokens"] for s in index["shards"]) != num_tokens:
                raise ValueError(f"{index_path}: shard token counts do not add up to num_tokens {num_tokens}.")
            offsets_path = split_dir / OFFSETS_FILE
            if not offsets_path.is_file():
                raise FileNotFoundError(f"Missing document offsets {offsets_path}.")
            try:
                stored = np.load(offsets_path)
            except Exception as exc:  # a damaged .npy header fails in numpy's parser with many error types
                raise ValueError(f"{offsets_path} is corrupt ({one_line(exc)}).") from None
            offsets = _check_offsets(stored, num_tokens, str(offsets_path))
            if (found := offsets.size - 1) != index["num_docs"]:
                raise ValueError(f"{offsets_path} holds {found} documents; the index says {index['num_docs']}.")
            maps = []
            for shard in index["shards"]:
                path = split_dir / shard["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"Missing shard {path}.")
                expected = shard["num_tokens"] * dtype.itemsize
                if (size := path.stat().st_size) != expected:
                    raise ValueError(f"Shard {path} has {size} bytes, not the {expected} indexed: it is truncated.")
                maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["num_tokens"],)))
            return cls(split_dir, index, offsets, maps)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index_path} is corrupt ({type(exc).__name__}: {exc}).") from None

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"Document {i} out of range for a store of {self.num_docs}.")
        k = self._doc_shard[i]
        base = self._shard_starts[k]
        return self._maps[k][self.offsets[i] - base : self.offsets[i + 1] - base]

    def verify(self) -> None:
        """Recompute every shard's sha256 (and the offsets', if recorded); `ValueError` names the first mismatch."""
        shards = [(s["file"], s["sha256"]) for s in self.index["shards"]]
        for name, expected in [(OFFSETS_FILE, self.index.get("offsets_sha256")), *shards]:
            path = self.directory / name
            if expected is not None and sha256_file(path) != expected:
                raise ValueError(f"{path} fails its sha256 check: the file is corrupt; re-run prepare.")

    def __repr__(self) -> str:
        return f"ShardStore({str(self.directory)!r}, num_docs={self.num_docs}, num_tokens={self.num_tokens})"


def is_prepared(path: str | Path) -> bool:
    """True when `path` holds a complete prepared dataset (summary and both split indexes)."""
    path = Path(path)
    return (path / DATASET_FILE).is_file() and all((path / s / INDEX_FILE).is_file() for s in SPLIT_DIRS)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else exc.reason
        raise ValueError(f"{path} is not valid JSON ({reason}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object.")
    return data


class _SplitWriter:
    """Appends documents to one split's shards, hashing each shard as it is written."""

    def __init__(self, directory: Path, shard_tokens: int) -> None:
        directory.mkdir(parents=True)
        self.directory, self.shard_tokens = directory, shard_tokens
        self.starts, self.num_tokens = array("q"), 0  # each document's start in the split's token stream; the end
        self.shards: list[dict[str, Any]] = []  # index entries; the last is the open shard's while `_file` is set
        self._file: BinaryIO | None = None  # the open shard, hashed by `_hasher` as it is written

    def add(self, tokens: np.ndarray) -> None:
        """Append one document, already in the shard dtype (never empty: it holds at least BOS)."""
        if self._file is not None and self.shards[-1]["num_tokens"] + tokens.size > self.shard_tokens:
            self.close_shard()
        if self._file is None:
            name = f"shard-{len(self.shards):05d}.bin"
            self.shards.append({"file": name, "num_tokens": 0})
            self._file, self._hasher = (self.directory / name).open("wb"), hashlib.sha256()
        self.starts.append(self.num_tokens)
        self.num_tokens += tokens.size
        self.shards[-1]["num_tokens"] += tokens.size
        data = tokens.tobytes()
        self._file.write(data)
        self._hasher.update(data)

    def close_shard(self) -> None:
        """Close the open shard (if any) and record its sha256; also how an abandoned writer lets go of its file."""
        if self._file is not None:
            self._file.close()
            self.shards[-1]["sha256"] = self._hasher.hexdigest()
            self._file = None

    def finish(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Close the last shard and write the offsets and the index; returns the split's counts."""
        self.close_shard()
        np.save(self.directory / OFFSETS_FILE, np.append(np.array(self.starts, dtype=np.int64), self.num_tokens))
        counts = {"num_docs": len(self.starts), "num_tokens": self.num_tokens}
        index = {"format": FORMAT, "version": FORMAT_VERSION, **meta, **counts, "offsets": OFFSETS_FILE}
        index |= {"offsets_sha256": sha256_file(self.directory / OFFSETS_FILE), "shards": self.shards}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return {**counts, "num_shards": len(self.shards)}


def prepare(
    spec: str,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    val_fraction: float = 0.01,
    shard_tokens: int = 2**26,
    max_tokens: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    load_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize `spec` into `out_dir` atomically and return the summary; `max_tokens` stops after the doc reaching it.
    If hashing leaves val empty (val_fraction > 0, ≥ 2 pieces), a second pass holds out the first by `fallback_key`."""
    from tqdm.auto import tqdm

    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive; got {shard_tokens}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory.")
    if out.exists() and not overwrite:
        if is_prepared(out):
            raise FileExistsError(f"{out} already holds a prepared dataset; pass overwrite=True to replace it.")
        if any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty; choose another directory or pass overwrite=True.")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"  # made by the first _SplitWriter
    started = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    writers: dict[str, _SplitWriter] = {}

    def tokenize_pass(forced_val: frozenset[str]) -> tuple[bool, str]:
        """Stream the source into fresh writers; (stopped by `max_tokens`, the id first in `fallback_key` order)."""
        first = (1 << 64, "")  # above every real key
        for s in SPLIT_DIRS:  # a second pass starts over: the held-out piece may sit anywhere in the train shards
            if s in writers:
                writers[s].close_shard()
                shutil.rmtree(tmp / s)
            writers[s] = _SplitWriter(tmp / s, shard_tokens)
        docs = iter_documents(spec, "all", text_field=text_field, val_fraction=val_fraction, load_kwargs=load_kwargs)
        total = 0
        with tqdm(desc=f"prepare {spec}", unit="doc", unit_scale=True, disable=not progress) as bar:
            while chunk := list(itertools.islice(docs, _ENCODE_CHUNK_DOCS)):
                encoded = tokenizer.encode_batch([d.text for d in chunk])
                for done, (doc, ids) in enumerate(zip(chunk, encoded, strict=True), start=1):
                    tokens = np.array([tokenizer.bos_id, *ids], dtype=dtype)
                    writers[split_of(doc.id, val_fraction, forced_val)].add(tokens)
                    first = min(first, fallback_key(doc.id))  # used only when every piece went to train
                    total += tokens.size
                    if max_tokens is not None and total >= max_tokens:
                        bar.update(done)
                        return True, first[1]
                bar.update(len(chunk))
                bar.set_postfix(tokens=f"{total:,}", refresh=False)
        return False, first[1]

    fallback: list[str] = []
    try:
        truncated, first_id = tokenize_pass(frozenset())
        num_pieces = len(writers["train"].starts)
        if val_fraction > 0 and not writers["val"].starts and num_pieces >= 2:
            fallback = [first_id]
            truncated, _ = tokenize_pass(frozenset(fallback))
            if progress:
                note = f"none of the {num_pieces} pieces fell into the validation split by hash; {fallback[0]!r}"
                print(f"note: {note} is held out instead (val_fallback in {DATASET_FILE}).", file=sys.stderr)
        meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id}
        meta |= {"pad_id": tokenizer.pad_id, "tokenizer": tokenizer.kind, "spec": spec}
        splits = {s: w.finish({**meta, "split": s}) for s, w in writers.items()}
        tokenizer.save(tmp)
        summary = {**meta, "text_field": text_field, "val_fraction": val_fraction, "val_fallback": fallback}
        summary |= {"max_tokens": max_tokens, "truncated": truncated, "splits": splits}
        (tmp / DATASET_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        for w in writers.values():
            w.close_shard()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    if out.exists():  # the old directory is removed only once the new one is in place
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return {**summary, "path": str(out), "seconds": round(time.perf_counter() - started, 3)}


def val_split_note(data_dir: str | Path) -> str | None:
    """One sentence on why the prepared `data_dir`'s validation split is empty and what to do; None if it has tokens."""
    data_dir = Path(data_dir)
    evaluate = "evaluate with `parcae eval RUN --data SPEC`"
    val_index = data_dir / "val" / INDEX_FILE
    if not val_index.is_file():
        return f"{data_dir} has no validation split (no val/{INDEX_FILE}); prepare the data again, or {evaluate}."
    if _read_json(val_index).get("num_tokens", 0) > 0:
        return None
    files = (data_dir / DATASET_FILE, data_dir / "train" / INDEX_FILE)
    dataset, train = (_read_json(path) if path.is_file() else {} for path in files)
    pieces, tokens = int(train.get("num_docs", 0)), int(train.get("num_tokens", 0))
    if dataset.get("val_fraction") == 0:
        why = " because val_fraction is 0; prepare the data with a val_fraction above 0"
    elif pieces == 0:
        why = " because the corpus holds no text; give more text"
    elif pieces == 1:  # a document longer than LONG_DOC_CHARS is always several pieces
        corpus = "reading stopped at max_tokens after" if dataset.get("truncated") else "the corpus is"
        why = f" because {corpus} a single document of {tokens:,} tokens, so nothing can be held out; give more text"
    else:  # only a directory prepared before the fallback existed gets here: re-preparing holds a piece out
        why = f": none of its {pieces:,} pieces fell into it by hash; prepare the data again (one piece is then "
        why += "held out), give more text, a larger val_fraction"
    return f"the validation split of {data_dir} is empty{why}, or {evaluate}."


def prepare_once(
    spec: str, target: Path, tokenizer: str, echo: Callable[[str], None], what: str, **options: Any
) -> Path:
    """`spec` if prepared, else `target`, tokenized once for `what` (a sweep, a lab) with `prepare(**options)`."""
    if is_prepared(spec):
        return Path(spec).resolve()
    if not is_prepared(target):
        echo(f"tokenizing {spec} into {target} (once for {what}) …")
        prepare(spec, get_tokenizer(tokenizer), target, **options, progress=False)
    return target.resolve()
