"""Document sources named by one spec string everywhere (README, "Data specs"), split by a stable hash of the id. Ids:
the path relative to the stdlib root or the spec's directory, `PATH.jsonl:LINE` (1-based), `PATH.parquet:ROW` (0-based),
`NAME:INDEX` (`hf:`); a document longer than LONG_DOC_CHARS comes as pieces `ID#0`, `ID#1`, … (`cut_text`)."""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "all")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
_HASH_BUCKETS = 10_000
LONG_DOC_CHARS, PIECE_CHARS = 65_536, 8_192  # longer documents are cut into pieces of at most PIECE_CHARS
_STDLIB_ROOT = Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class SourceSpec:
    """A parsed spec: `kind` is "stdlib", "path" or "hf"."""

    kind: str
    path: Path | None = None  # kind == "path"
    name: str | None = None  # kind == "hf"
    config: str | None = None
    hf_split: str = "train"


def parse_spec(spec: str) -> SourceSpec:
    """Parse a spec string; a path is checked later. "stdlib" is always the embedded corpus ("./stdlib" is not)."""
    spec = spec.strip()
    if not spec:
        raise ValueError("The data spec is empty; use 'stdlib', a file or directory path, or 'hf:NAME'.")
    if spec == "stdlib":
        return SourceSpec("stdlib")
    if spec.startswith("hf:"):
        rest, at, hf_split = spec[3:].partition("@")
        name, colon, config = rest.partition(":")
        if not name or (colon and not config) or (at and not hf_split):
            raise ValueError(f"Malformed Hugging Face spec {spec!r}; expected 'hf:NAME[:CONFIG][@SPLIT]'.")
        return SourceSpec("hf", name=name, config=config or None, hf_split=hf_split or "train")
    return SourceSpec("path", path=Path(spec).expanduser())


def _id_hash(doc_id: str) -> int:
    digest = hashlib.blake2b(doc_id.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def split_of(doc_id: str, val_fraction: float, forced_val: Collection[str] = frozenset()) -> str:
    """ "val" when the id's BLAKE2b hash mod 10 000 is below `val_fraction` · 10 000 or the id is in `forced_val`."""
    in_val = doc_id in forced_val or _id_hash(doc_id) % _HASH_BUCKETS < val_fraction * _HASH_BUCKETS
    return "val" if in_val else "train"


def fallback_key(doc_id: str) -> tuple[int, str]:
    """Order in which `shards.prepare` holds out a train piece when hashing leaves "val" empty (id only: stable)."""
    return _id_hash(doc_id), doc_id


def cut_text(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of ≤ `piece_chars` chars, each cut after its window's last newline past half."""
    if piece_chars < 1:
        raise ValueError(f"piece_chars must be positive; got {piece_chars}.")
    start = 0
    while len(text) - start > piece_chars:
        newline = text.rfind("\n", start + piece_chars // 2, start + piece_chars)
        end = newline + 1 if newline >= 0 else start + piece_chars
        yield text[start:end]
        start = end
    yield text[start:]


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[str, ...]:
    """Relative posix paths of the stdlib's `.py` files, sorted (os.walk does not follow symlinks)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(_STDLIB_ROOT):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        rel = Path(dirpath).relative_to(_STDLIB_ROOT)
        found.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
    return tuple(sorted(found))


def _iter_stdlib() -> Iterator[Document]:
    for rel in _stdlib_files():
        try:
            yield Document(rel, (_STDLIB_ROOT / rel).read_bytes().decode("utf-8"))
        except UnicodeDecodeError:  # a handful of test fixtures are deliberately not UTF-8
            continue


@lru_cache(maxsize=1)
def stdlib_summary() -> dict[str, Any]:
    """The embedded corpus at a glance: path, UTF-8 files used, their bytes, and non-UTF-8 files skipped."""
    sizes = [len(doc.text.encode("utf-8")) for doc in _iter_stdlib()]  # strictly decoded: the same bytes
    skipped = len(_stdlib_files()) - len(sizes)
    return {"path": str(_STDLIB_ROOT), "files": len(sizes), "bytes": sum(sizes), "skipped_non_utf8": skipped}


def _local_files(path: Path) -> tuple[Path, list[Path]]:
    """(root for relative ids, files to read) for a file or directory spec."""
    if not path.exists():
        raise ValueError(f"Data path {path} does not exist.")
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES]
        files = sorted(found, key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"Directory {path} holds no {', '.join(FILE_SUFFIXES)} files.")
        return path, files
    if path.suffix not in FILE_SUFFIXES:
        raise ValueError(f"Unsupported data file {path}: expected one of {', '.join(FILE_SUFFIXES)}.")
    return path.parent, [path]


def _document(doc_id: str, value: Any, text_field: str, where: str) -> Iterator[Document]:
    """The record's document: none for a null text, an error for anything but a string."""
    if isinstance(value, str):
        yield Document(doc_id, value)
    elif value is not None:
        raise ValueError(f"{where}: field {text_field!r} is {type(value).__name__}, not a string.")


def _iter_jsonl(path: Path, rel: str, text_field: str) -> Iterator[Document]:
    with path.open("rb") as f:  # decoded line by line, so invalid UTF-8 is reported at its line
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where} is not valid UTF-8 ({exc.reason} at byte {exc.start}).") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where} is not valid JSON ({exc.msg}).") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{where} has no field {text_field!r}.")
            yield from _document(f"{rel}:{lineno}", record[text_field], text_field, where)


def _iter_parquet(path: Path, rel: str, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
        from pyarrow import ArrowException
    except ImportError:
        raise ImportError("Reading .parquet files needs pyarrow: pip install parcae-looped[hf]") from None
    # Page CRCs are checked where stored (unchecked, a flipped bit reads back as other text); errors name file and row.
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
    except (ArrowException, OSError) as exc:
        raise ValueError(f"{path} is not a readable Parquet file ({one_line(exc)}).") from None
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}).")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[text_field]):  # streams row groups, never the whole file
            for value in batch.column(0).to_pylist():
                yield from _document(f"{rel}:{row}", value, text_field, f"{path} row {row}")
                row += 1
    except (ArrowException, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupt after row {row} ({one_line(exc)}).") from None


def one_line(exc: BaseException) -> str:
    """`exc`'s message on one line, for error messages that quote it."""
    return " ".join(str(exc).split())


def _iter_path(root: Path, files: list[Path], text_field: str) -> Iterator[Document]:
    for file in files:
        rel = file.relative_to(root).as_posix()
        if file.suffix == ".txt":
            try:
                yield Document(rel, file.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise ValueError(f"{file} is not valid UTF-8 ({exc.reason} at byte {exc.start}).") from None
        elif file.suffix == ".jsonl":
            yield from _iter_jsonl(file, rel, text_field)
        else:
            yield from _iter_parquet(file, rel, text_field)


def _iter_hf(spec: SourceSpec, text_field: str, load_kwargs: Mapping[str, Any]) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise ImportError("hf: data specs need the datasets package: pip install parcae-looped[hf]") from None
    stream = datasets.load_dataset(spec.name, spec.config, split=spec.hf_split, streaming=True, **load_kwargs)
    for index, record in enumerate(stream):
        where = f"Dataset {spec.name} record {index}"
        if text_field not in record:
            raise ValueError(f"{where} has no field {text_field!r}.")
        yield from _document(f"{spec.name}:{index}", record[text_field], text_field, where)


def iter_documents(
    spec: str,
    split: str = "train",
    *,
    text_field: str = "text",
    val_fraction: float = 0.01,
    forced_val: Collection[str] = frozenset(),
    load_kwargs: Mapping[str, Any] | None = None,
) -> Iterator[Document]:
    """Documents (long ones as pieces) of `spec` in `split`, in source order; spec and path errors raise here, an empty
    split at the end. `forced_val`: a prepared "val_fallback"; `load_kwargs` go to `datasets.load_dataset`."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1]; got {val_fraction}.")
    parsed = parse_spec(spec)
    if parsed.kind == "path":
        assert parsed.path is not None
        docs = _iter_path(*_local_files(parsed.path), text_field)  # path errors raise now, not at the first next()
    else:
        docs = _iter_stdlib() if parsed.kind == "stdlib" else _iter_hf(parsed, text_field, load_kwargs or {})

    def pieces() -> Iterator[Document]:  # a generator of its own, so that the checks above raise at the call
        count = 0
        for doc in docs:
            long = len(doc.text) > LONG_DOC_CHARS  # then its pieces `ID#k` are the documents
            for piece in (Document(f"{doc.id}#{k}", p) for k, p in enumerate(cut_text(doc.text))) if long else (doc,):
                if split == "all" or split_of(piece.id, val_fraction, forced_val) == split:
                    count += 1
                    yield piece
        if count == 0:
            raise ValueError(f"Data source {spec!r} has no documents in split {split!r}.")

    return pieces()
