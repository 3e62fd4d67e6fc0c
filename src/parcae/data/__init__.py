"""The data layer: tokenizers, document sources, prepared token shards, and best-fit row packing."""

from .packing import BestFitPacker, rank_documents, val_batches
from .shards import MemoryStore, ShardStore, TokenStore, is_prepared, prepare, token_dtype, val_split_note
from .sources import Document, SourceSpec, iter_documents, parse_spec, split_of, stdlib_summary
from .tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, get_tokenizer, load_tokenizer, train_bpe

__all__ = ["BestFitPacker", "rank_documents", "val_batches"]
__all__ += ["MemoryStore", "ShardStore", "TokenStore", "is_prepared", "prepare", "token_dtype", "val_split_note"]
__all__ += ["Document", "SourceSpec", "iter_documents", "parse_spec", "split_of", "stdlib_summary"]
__all__ += ["BPETokenizer", "ByteTokenizer", "Tokenizer", "get_tokenizer", "load_tokenizer", "train_bpe"]
