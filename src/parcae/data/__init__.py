"""The data layer: tokenizers, document sources, prepared token shards, and best-fit row packing."""

from .packing import BestFitPacker, rank_documents, val_batches
from .shards import MemoryStore, ShardStore, TokenStore, is_prepared, prepare, token_dtype, val_split_note
from .sources import Document, SourceSpec, iter_documents, parse_spec, split_of, stdlib_summary
from .tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, get_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "BPETokenizer",
    "BestFitPacker",
    "ByteTokenizer",
    "Document",
    "MemoryStore",
    "ShardStore",
    "SourceSpec",
    "TokenStore",
    "Tokenizer",
    "get_tokenizer",
    "is_prepared",
    "iter_documents",
    "load_tokenizer",
    "parse_spec",
    "prepare",
    "rank_documents",
    "split_of",
    "stdlib_summary",
    "token_dtype",
    "train_bpe",
    "val_batches",
    "val_split_note",
]
