"""Tokenize a corpus once into memory-mapped shards, and read tokens back as per-document arrays.

Layout written by `prepare(spec, tokenizer, out_dir)`:

    out_dir/dataset.json        summary (spec, tokenizer, per-split counts, "val_fallback"); written last
    out_dir/tokenizer.json      the tokenizer (`load_tokenizer(out_dir)` gets it back)
    out_dir/{train,val}/
        shard-00000.bin ...     raw little-endian uint16 tokens (uint32 when vocab_size > 65536)
        docs.npy                int64 [num_docs + 1]: start of each document in the split's token stream
                                (the shards concatenated), plus the end; global, not per shard
        index.json              dtype, vocab_size, counts, each shard's token count and sha256, docs.npy's sha256

Every document is stored as [BOS] + encode(text); the packer relies on BOS opening each document. A
document never straddles two shards, so `doc(i)` is always a view into one memory map: a shard is
closed before a document that would overflow `shard_tokens` (a single longer document gets a shard to
itself). Everything is written into a hidden sibling directory that is renamed into place at the end,
so a crash leaves no half-written directory that `is_prepared` would accept.

The split is the source's (`sources.split_of`, per piece of a long document). When hashing leaves "val"
empty although there are at least two pieces, `prepare` holds out one train piece (the first in
`sources.fallback_key` order) and records its id as "val_fallback"; this directory is then the source
of truth for the split. `val_split_note` says, in one sentence, why a prepared val split is empty.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import numpy as np

from .sources import Document, fallback_key, iter_documents, split_of
from .tokenizer import Tokenizer

FORMAT = "parcae-shards"
FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
INDEX_FILE = "index.json"
OFFSETS_FILE = "docs.npy"
SPLIT_DIRS = ("train", "val")
_ENCODE_CHUNK_DOCS = 512
_ENCODE_CHUNK_CHARS = 1 << 23
_WRITE_CHUNK_TOKENS = 1 << 22
_HASH_CHUNK_BYTES = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned little-endian dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@runtime_checkable
class TokenStore(Protocol):
    """Documents as token arrays, each opening with BOS."""

    @property
    def num_docs(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def doc_lengths(self) -> np.ndarray:
        """int64 [num_docs]: tokens per document (without reading any token)."""
        ...

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document `i` (a view, not a copy)."""
        ...


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

    @classmethod
    def from_token_lists(cls, docs: Iterable[Iterable[int]], dtype: Any = np.int64) -> MemoryStore:
        """A store holding exactly `docs` (no BOS is added)."""
        arrays = [np.asarray(list(d) if not isinstance(d, np.ndarray) else d, dtype=dtype) for d in docs]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([a.size for a in arrays], out=offsets[1:])
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        return cls(tokens.astype(dtype, copy=False), offsets)

    @classmethod
    def from_documents(
        cls, docs: Iterable[Document | str], tokenizer: Tokenizer, *, batch_docs: int = 256
    ) -> MemoryStore:
        """Tokenize `docs` in memory, each stored as [BOS] + encode(text)."""
        dtype = token_dtype(tokenizer.vocab_size)
        arrays: list[np.ndarray] = []
        for batch in _batched((d.text if isinstance(d, Document) else d for d in docs), batch_docs):
            for ids in tokenizer.encode_batch(batch):
                arr = np.empty(len(ids) + 1, dtype=dtype)  # converted per batch: no corpus-sized int lists
                arr[0] = tokenizer.bos_id
                arr[1:] = ids
                arrays.append(arr)
        return cls.from_token_lists(arrays, dtype=dtype)

    @property
    def num_docs(self) -> int:
        return self.offsets.size - 1

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    @property
    def dtype(self) -> np.dtype:
        return self.tokens.dtype

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"Document {i} out of range for a store of {self.num_docs}.")
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __repr__(self) -> str:
        return f"MemoryStore(num_docs={self.num_docs}, num_tokens={self.num_tokens})"


class ShardStore:
    """One split of a prepared directory, memory-mapped. Open with `ShardStore.open(directory, split)`."""

    def __init__(self, directory: Path, index: dict[str, Any], offsets: np.ndarray, maps: list[np.ndarray]) -> None:
        self.directory = directory
        self.index = index
        self.offsets = offsets
        self.doc_lengths = np.diff(offsets)
        self._maps = maps
        counts = [s["num_tokens"] for s in index["shards"]]
        self._shard_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        # Shard of each document: the last shard starting at or before the document's start.
        self._doc_shard = np.searchsorted(self._shard_starts[:-1], offsets[:-1], side="right") - 1
        if self.num_docs:
            ends_within = offsets[1:] <= self._shard_starts[self._doc_shard + 1]
            if not np.all(ends_within):
                raise ValueError(f"{directory}: a document straddles two shards; the index is corrupt.")

    @classmethod
    def open(cls, directory: str | Path, split: str = "train") -> ShardStore:
        """Open `directory/split`, checking the index and every shard's size (not its checksum; see `verify`)."""
        split_dir = Path(directory) / split
        index_path = split_dir / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"No prepared split at {split_dir} (missing {INDEX_FILE}); run prepare first.")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else exc.reason
            raise ValueError(f"{index_path} is not valid JSON ({reason}).") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{index_path} is not a {FORMAT} index.")
        if index.get("version") != FORMAT_VERSION:
            raise ValueError(f"{index_path} has format version {index.get('version')}; expected {FORMAT_VERSION}.")
        try:
            return cls._open_checked(split_dir, index_path, index)
        except (KeyError, TypeError, AttributeError) as exc:  # a field missing or of the wrong type: damaged
            raise ValueError(f"{index_path} is corrupt ({type(exc).__name__}: {exc}).") from None

    @classmethod
    def _open_checked(cls, split_dir: Path, index_path: Path, index: dict[str, Any]) -> ShardStore:
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
            raise ValueError(f"{offsets_path} is corrupt ({' '.join(str(exc).split())}).") from None
        offsets = _check_offsets(stored, num_tokens, str(offsets_path))
        if offsets.size - 1 != index["num_docs"]:
            raise ValueError(f"{offsets_path} holds {offsets.size - 1} documents; the index says {index['num_docs']}.")
        maps = []
        for shard in index["shards"]:
            path = split_dir / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"Missing shard {path}.")
            expected = shard["num_tokens"] * dtype.itemsize
            actual = path.stat().st_size
            if actual != expected:
                raise ValueError(f"Shard {path} has {actual} bytes but its index expects {expected}: it is truncated.")
            maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["num_tokens"],)))
        return cls(split_dir, index, offsets, maps)

    @property
    def num_docs(self) -> int:
        return self.offsets.size - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.index["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"Document {i} out of range for a store of {self.num_docs}.")
        k = self._doc_shard[i]
        base = self._shard_starts[k]
        return self._maps[k][self.offsets[i] - base : self.offsets[i + 1] - base]

    def verify(self) -> None:
        """Recompute every shard's sha256 (and the offsets'); `ValueError` names the first file that does not match."""
        offsets = self.directory / OFFSETS_FILE
        expected = self.index.get("offsets_sha256")  # absent in directories prepared before it was recorded
        if expected is not None and sha256_file(offsets) != expected:
            raise ValueError(f"{offsets} fails its sha256 check: the file is corrupt; re-run prepare.")
        for shard in self.index["shards"]:
            path = self.directory / shard["file"]
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                raise ValueError(f"Shard {path} fails its sha256 check: the file is corrupt; re-run prepare.")

    def __repr__(self) -> str:
        return f"ShardStore({str(self.directory)!r}, num_docs={self.num_docs}, num_tokens={self.num_tokens})"


def is_prepared(path: str | Path) -> bool:
    """True when `path` holds a complete prepared dataset (summary and both split indexes)."""
    path = Path(path)
    return (path / DATASET_FILE).is_file() and all((path / s / INDEX_FILE).is_file() for s in SPLIT_DIRS)


# ---------------------------------------------------------------------------------------------- writing
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class _Shard:
    file: str
    handle: BinaryIO
    hasher: Any
    num_tokens: int = 0


class _SplitWriter:
    """Appends documents to one split's shards, buffering writes and hashing as it goes."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory = directory
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.starts = array("q")
        self.num_tokens = 0
        self.shards: list[dict[str, Any]] = []
        self._open: _Shard | None = None
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        directory.mkdir(parents=True)

    @property
    def num_docs(self) -> int:
        return len(self.starts)

    def add(self, tokens: np.ndarray) -> None:
        n = tokens.size
        if self._open is not None and self._open.num_tokens and self._open.num_tokens + n > self.shard_tokens:
            self._close_shard()
        if self._open is None:
            name = f"shard-{len(self.shards):05d}.bin"
            self._open = _Shard(name, (self.directory / name).open("wb"), hashlib.sha256())
        self.starts.append(self.num_tokens)
        self.num_tokens += n
        self._open.num_tokens += n
        self._pending.append(tokens)
        self._pending_tokens += n
        if self._pending_tokens >= _WRITE_CHUNK_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._open is None or not self._pending:
            return
        data = np.concatenate(self._pending).astype(self.dtype, copy=False).tobytes()
        self._open.handle.write(data)
        self._open.hasher.update(data)
        self._pending, self._pending_tokens = [], 0

    def _close_shard(self) -> None:
        assert self._open is not None
        self._flush()
        self._open.handle.close()
        self.shards.append(
            {"file": self._open.file, "num_tokens": self._open.num_tokens, "sha256": self._open.hasher.hexdigest()}
        )
        self._open = None

    def finish(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        if self._open is not None:
            self._close_shard()
        offsets = np.frombuffer(self.starts, dtype=np.int64) if self.starts else np.zeros(0, dtype=np.int64)
        np.save(self.directory / OFFSETS_FILE, np.append(offsets, self.num_tokens).astype(np.int64))
        index = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            **meta,
            "num_docs": len(self.starts),
            "num_tokens": self.num_tokens,
            "offsets": OFFSETS_FILE,
            "offsets_sha256": sha256_file(self.directory / OFFSETS_FILE),
            "shards": self.shards,
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return {"num_docs": index["num_docs"], "num_tokens": self.num_tokens, "num_shards": len(self.shards)}

    def abort(self) -> None:
        if self._open is not None:
            self._open.handle.close()


def _chunks(docs: Iterator[Document]) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc.text)
        if len(chunk) >= _ENCODE_CHUNK_DOCS or chars >= _ENCODE_CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _claim_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory.")
    if overwrite or not out.exists():
        return
    if is_prepared(out):
        raise FileExistsError(f"{out} already holds a prepared dataset; pass overwrite=True to replace it.")
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose another directory or pass overwrite=True.")


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
    """Tokenize every document of `spec` into `out_dir` (layout in the module docstring); returns the summary.

    One pass over the source: each piece goes to train or val by its id (see `sources.split_of`). If
    that leaves val empty while `val_fraction` > 0 and train holds at least two pieces, a second pass
    holds out the train piece that comes first in `sources.fallback_key` order (the split then depends
    only on the set of ids, so it is stable; it happens only for corpora of a few pieces). With
    `max_tokens`, reading stops after the document that brings the total (both splits) to at least
    `max_tokens`. An existing non-empty `out_dir` is only replaced with `overwrite=True`.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive; got {shard_tokens}.")
    out = Path(out_dir)
    _claim_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    started = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _SplitWriter(tmp / s, dtype, shard_tokens) for s in SPLIT_DIRS}
    fallback: list[str] = []

    def tokenize_pass(forced_val: frozenset[str]) -> tuple[bool, str | None]:
        docs = iter_documents(spec, "all", text_field=text_field, val_fraction=val_fraction, load_kwargs=load_kwargs)
        return _tokenize_into(docs, tokenizer, writers, val_fraction, forced_val, max_tokens, progress, spec)

    try:
        truncated, first_train = tokenize_pass(frozenset())
        if val_fraction > 0 and writers["val"].num_docs == 0 and writers["train"].num_docs >= 2:
            assert first_train is not None
            fallback = [first_train]
            num_pieces = writers["train"].num_docs
            for s in SPLIT_DIRS:  # start over: the held-out piece may sit anywhere in the train shards
                writers[s].abort()
                shutil.rmtree(tmp / s)
                writers[s] = _SplitWriter(tmp / s, dtype, shard_tokens)
            truncated, _ = tokenize_pass(frozenset(fallback))
            if progress:
                print(
                    f"note: none of the {num_pieces} pieces fell into the validation split by hash; "
                    f"{first_train!r} is held out instead (val_fallback in {DATASET_FILE}).",
                    file=sys.stderr,
                )
        meta = {
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "pad_id": tokenizer.pad_id,
            "tokenizer": tokenizer.kind,
            "spec": spec,
        }
        splits = {s: w.finish({**meta, "split": s}) for s, w in writers.items()}
        tokenizer.save(tmp)
        summary = {
            **meta,
            "text_field": text_field,
            "val_fraction": val_fraction,
            "val_fallback": fallback,
            "max_tokens": max_tokens,
            "truncated": truncated,
            "splits": splits,
        }
        (tmp / DATASET_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_into_place(tmp, out)
    return {**summary, "path": str(out), "seconds": round(time.perf_counter() - started, 3)}


def _tokenize_into(
    docs: Iterator[Document],
    tokenizer: Tokenizer,
    writers: dict[str, _SplitWriter],
    val_fraction: float,
    forced_val: frozenset[str],
    max_tokens: int | None,
    progress: bool,
    spec: str,
) -> tuple[bool, str | None]:
    """Stream `docs` into the writers. Returns (stopped early by `max_tokens`, the train piece that comes
    first in `fallback_key` order, or None when train is empty)."""
    from tqdm.auto import tqdm

    total = 0
    first_train: tuple[int, str] | None = None
    bos = np.array([tokenizer.bos_id], dtype=np.int64)
    with tqdm(desc=f"prepare {spec}", unit="doc", unit_scale=True, disable=not progress) as bar:
        for chunk in _chunks(docs):
            encoded = tokenizer.encode_batch([d.text for d in chunk])
            for done, (doc, ids) in enumerate(zip(chunk, encoded, strict=True), start=1):
                tokens = np.concatenate([bos, np.asarray(ids, dtype=np.int64)])
                split = split_of(doc.id, val_fraction, forced_val)
                writers[split].add(tokens)
                if split == "train":
                    key = fallback_key(doc.id)
                    first_train = key if first_train is None else min(first_train, key)
                total += tokens.size
                if max_tokens is not None and total >= max_tokens:
                    bar.update(done)
                    return True, None if first_train is None else first_train[1]
            bar.update(len(chunk))
            bar.set_postfix(tokens=f"{total:,}", refresh=False)
    return False, None if first_train is None else first_train[1]


def val_split_note(data_dir: str | Path) -> str | None:
    """None when the prepared `data_dir`'s validation split holds tokens; otherwise one sentence saying why
    it is empty and what to do instead, for any tool to print (prefixed with "warning: " or "note: ")."""
    data_dir = Path(data_dir)
    evaluate = "evaluate with `parcae eval RUN --data SPEC`"
    val_index = data_dir / "val" / INDEX_FILE
    if not val_index.is_file():
        return f"{data_dir} has no validation split (no val/{INDEX_FILE}); prepare the data again, or {evaluate}."
    if _read_json(val_index).get("num_tokens", 0) > 0:
        return None
    dataset = _read_json(data_dir / DATASET_FILE) if (data_dir / DATASET_FILE).is_file() else {}
    train_index = data_dir / "train" / INDEX_FILE
    train = _read_json(train_index) if train_index.is_file() else {}
    pieces, tokens = int(train.get("num_docs", 0)), int(train.get("num_tokens", 0))
    where = f"the validation split of {data_dir} is empty"
    if dataset.get("val_fraction") == 0:
        return f"{where} because val_fraction is 0; prepare the data with a val_fraction above 0, or {evaluate}."
    if pieces == 0:
        return f"{where} because the corpus holds no text; give more text, or {evaluate}."
    if pieces == 1:  # a document longer than LONG_DOC_CHARS is always several pieces
        corpus = "reading stopped at max_tokens after" if dataset.get("truncated") else "the corpus is"
        return (
            f"{where} because {corpus} a single document of {tokens:,} tokens, so nothing can be held out; "
            f"give more text, or {evaluate}."
        )
    # Only a directory prepared before the fallback existed gets here: re-preparing holds a piece out.
    return (
        f"{where}: none of its {pieces:,} pieces fell into it by hash; prepare the data again (one piece is then "
        f"held out), give more text, a larger val_fraction, or {evaluate}."
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object.")
    return data


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
