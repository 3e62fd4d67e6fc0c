"""`parcae tokenizer train` and `parcae data prepare`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .args import EPILOG_DATA, positive_int


def register(commands: argparse._SubParsersAction) -> None:
    tokenizer = commands.add_parser("tokenizer", help="train a BPE tokenizer").add_subparsers(
        dest="tokenizer_command", required=True, metavar="ACTION"
    )
    tok_train = tokenizer.add_parser(
        "train",
        help="train a byte-level BPE tokenizer (GPT-4-style split, <|bos|> <|eos|> <|pad|>)",
        epilog=EPILOG_DATA,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tok_train.add_argument("--data", required=True, help="data spec")
    tok_train.add_argument("--vocab-size", type=positive_int, required=True)
    tok_train.add_argument("--out", required=True, metavar="DIR")
    tok_train.add_argument(
        "--max-chars",
        type=positive_int,
        help="read at most this many characters in all (default: the whole corpus; a warning says when it cuts)",
    )
    tok_train.add_argument("--text-field", default="text")

    tok_train.set_defaults(handler=cmd_tokenizer)

    data = commands.add_parser("data", help="tokenize a corpus into shards").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    prep = data.add_parser(
        "prepare",
        help="tokenize SPEC once into memory-mapped shards (train/ and val/)",
        epilog=EPILOG_DATA,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument("spec", metavar="SPEC")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--tokenizer", default="byte", help="'byte' (default) or a tokenizer.json / directory")
    prep.add_argument("--text-field", default="text")
    prep.add_argument("--val-fraction", type=float, default=0.01)
    prep.add_argument("--max-tokens", type=positive_int, help="stop after this many tokens")

    prep.set_defaults(handler=cmd_data)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from ..data.sources import iter_documents
    from ..data.tokenizer import train_bpe

    texts = (doc.text for doc in iter_documents(args.data, "train", text_field=args.text_field))
    tokenizer = train_bpe(texts, args.vocab_size, max_chars=args.max_chars)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    print(f"saved a {tokenizer.vocab_size}-token BPE tokenizer to {out / 'tokenizer.json'}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from ..data.shards import prepare, val_split_note
    from ..data.tokenizer import get_tokenizer

    summary = prepare(args.spec, get_tokenizer(args.tokenizer), args.out, text_field=args.text_field,
                      val_fraction=args.val_fraction, max_tokens=args.max_tokens)  # fmt: skip
    print(json.dumps(summary, indent=2, default=str))
    note = val_split_note(args.out)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    return 0
