"""Tokenizers behind one small interface: a dependency-free byte tokenizer and a trained byte-level BPE. `encode` never
emits a special, not even for a literal "<|bos|>" in the text (a corpus cannot inject document boundaries). Saved as
`DIR/tokenizer.json`: the Hugging Face file for BPE (it has a "model" key) or a tiny `{"kind": "byte", ...}` record."""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .sources import LONG_DOC_CHARS, cut_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIALS = (BOS, EOS, PAD)
TOKENIZER_FILE = "tokenizer.json"

# GPT-4 (cl100k) pre-tokenization, but digits split in groups of at most two (as in the paper's tokenizer).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Lone surrogates round-trip through the byte tokenizer as their 3-byte form; other invalid bytes decode to U+FFFD.
_DECODE_ERRORS = "parcae-surrogatepass-replace"
_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogatepass_or_replace(exc: UnicodeError) -> tuple[str, int]:
    try:
        return codecs.lookup_error("surrogatepass")(exc)
    except UnicodeDecodeError:
        return codecs.replace_errors(exc)


codecs.register_error(_DECODE_ERRORS, _surrogatepass_or_replace)


@runtime_checkable
class Tokenizer(Protocol):
    """What Parcae needs from a tokenizer. `decode` drops specials and turns invalid UTF-8 into U+FFFD; `token_bytes`
    (int64 [vocab_size], 0 for specials) turns nats/token into bits per byte; `save` returns the file's path."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def token_bytes(self) -> np.ndarray: ...
    def save(self, directory: str | Path) -> Path: ...


def _id_array(ids: Iterable[int], vocab_size: int) -> np.ndarray:
    arr = np.asarray(ids if hasattr(ids, "__len__") else list(ids), dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"Token ids must lie in [0, {vocab_size}); got {int(arr.min())}..{int(arr.max())}.")
    return arr


class ByteTokenizer:
    """Ids 0..255: UTF-8 bytes ("surrogatepass": `decode(encode(s)) == s` for every str); 256-258: BOS, EOS, PAD."""

    kind = "byte"
    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        arr = _id_array(ids, self.vocab_size)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors=_DECODE_ERRORS)

    def token_bytes(self) -> np.ndarray:
        return (np.arange(self.vocab_size) < 256).astype(np.int64)

    def save(self, directory: str | Path) -> Path:
        specials = {BOS: self.bos_id, EOS: self.eos_id, PAD: self.pad_id}
        record = {"kind": self.kind, "vocab_size": self.vocab_size, "specials": specials}
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class BPETokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` (`.hf`) with the three specials; a lone surrogate encodes as U+FFFD."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        ids = {name: hf_tokenizer.token_to_id(name) for name in SPECIALS}
        if missing := [name for name, i in ids.items() if i is None]:
            raise ValueError(f"Tokenizer lacks the special token(s) {', '.join(missing)}.")
        from tokenizers import pre_tokenizers

        added = {t.content for t in hf_tokenizer.get_added_tokens_decoder().values()}
        symbols = set().union(*(t for t in hf_tokenizer.get_vocab(with_added_tokens=False) if t not in added))
        if not symbols <= set(pre_tokenizers.ByteLevel.alphabet()):  # `token_bytes` counts one byte per symbol
            raise ValueError("Tokenizer is not a byte-level BPE (its tokens are not spelled in byte symbols).")
        hf_tokenizer.encode_special_tokens = True  # a literal "<|bos|>" in a text is text, never the special
        self.hf = hf_tokenizer
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # fast: skips offsets
        try:
            encodings = encode(list(texts), add_special_tokens=False)
        except TypeError:  # a lone surrogate: Rust strings cannot hold one
            encodings = encode([_SURROGATE.sub("\ufffd", t) for t in texts], add_special_tokens=False)
        return [enc.ids for enc in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(_id_array(ids, self.vocab_size).tolist(), skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        # A byte-level token is spelled with one alphabet symbol per byte, so its length is its byte count.
        out = np.zeros(self.vocab_size, dtype=np.int64)  # 0 for the added tokens (the specials)
        for token, i in self.hf.get_vocab(with_added_tokens=False).items():
            out[i] = len(token)
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))
        return path

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def train_bpe(texts: Iterable[str], vocab_size: int, *, max_chars: int | None = None) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` ids, the last three specials (fewer, with a warning, if text is short)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIALS)} (bytes + specials); got {vocab_size}.")
    if max_chars is not None and max_chars < 0:
        raise ValueError(f"max_chars must be non-negative; got {max_chars}.")
    chars, capped = 0, False

    def feed() -> Iterator[str]:
        # Long texts go in `cut_text` pieces (ending at line ends where they can): the trainer's batches stay small.
        nonlocal chars, capped
        for text in texts:
            for piece in cut_text(text) if len(text) > LONG_DOC_CHARS else (text,):
                if max_chars is not None and chars + len(piece) > max_chars:
                    piece, capped = piece[: max_chars - chars], True  # there is text beyond the cap
                chars += len(piece)
                if piece:
                    yield piece
                if capped:
                    return

    tok = HFTokenizer(models.BPE(byte_fallback=False))
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 byte symbols: any text round-trips
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS), min_frequency=2, show_progress=False, initial_alphabet=alphabet
    )
    tok.train_from_iterator(feed(), trainer=trainer)
    tok.add_special_tokens(list(SPECIALS))  # appended after the learned vocabulary, as in ByteTokenizer
    bpe = BPETokenizer(tok)
    if capped:
        cap = f"max_chars: the tokenizer was trained on the first {chars:,} characters"
        print(f"warning: {cap}; the rest was not read.", file=sys.stderr)
    if bpe.vocab_size < vocab_size:
        supports = f"the text supports a vocabulary of {bpe.vocab_size:,} tokens, not the {vocab_size:,} asked for"
        print(f"warning: {supports} ({chars:,} characters read); give more (or more varied) text.", file=sys.stderr)
    return bpe


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `save`: `path` is its directory or its tokenizer.json."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"No tokenizer file at {file}.")
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is not a valid tokenizer.json ({exc}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a valid tokenizer.json (expected a JSON object).")
    if "model" in data:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(text)
        except Exception as exc:
            raise ValueError(f"{file} is not a valid Hugging Face tokenizer file ({exc}).") from None
        try:
            return BPETokenizer(hf)
        except ValueError as exc:
            raise ValueError(f"{file}: {exc}") from None
    if data.get("kind") == "byte":
        if data.get("vocab_size", 259) != 259:
            raise ValueError(f"{file}: a byte tokenizer has vocab_size 259, not {data.get('vocab_size')}.")
        return ByteTokenizer()
    raise ValueError(f"{file} is neither a Hugging Face tokenizer file nor a byte-tokenizer record.")


def get_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """`"byte"` → `ByteTokenizer`; anything else is a path for `load_tokenizer`."""
    return ByteTokenizer() if str(name_or_path) == "byte" else load_tokenizer(name_or_path)
