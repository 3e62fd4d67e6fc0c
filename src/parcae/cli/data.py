"""`parcae tokenizer train` and `parcae data prepare`."""

import argparse
import json
import sys

from .args import EPILOG_DATA, Commands, actions, command, positive_int


def register(commands: Commands) -> None:
    tokenizer = actions(commands.add_parser("tokenizer", help="train a BPE tokenizer"), "tokenizer_command")
    about = "train a byte-level BPE tokenizer (GPT-4-style split, <|bos|> <|eos|> <|pad|>)"
    add = command(tokenizer, "train", about, epilog=EPILOG_DATA, handler=cmd_tokenizer).add_argument
    add("--data", required=True, help="data spec")
    add("--vocab-size", type=positive_int, required=True)
    add("--out", required=True, metavar="DIR")
    add("--max-chars", type=positive_int, help="read at most this many characters (default: all; warns when it cuts)")
    add("--text-field", default="text")

    data = actions(commands.add_parser("data", help="tokenize a corpus into shards"), "data_command")
    about = "tokenize SPEC once into memory-mapped shards (train/ and val/)"
    add = command(data, "prepare", about, epilog=EPILOG_DATA, handler=cmd_data).add_argument
    add("spec", metavar="SPEC")
    add("--out", required=True, metavar="DIR")
    add("--tokenizer", default="byte", help="'byte' (default) or a tokenizer.json / directory")
    add("--text-field", default="text")
    add("--val-fraction", type=float, default=0.01)
    add("--max-tokens", type=positive_int, help="stop after this many tokens")


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from ..data.sources import iter_documents
    from ..data.tokenizer import train_bpe

    texts = (doc.text for doc in iter_documents(args.data, "train", text_field=args.text_field))
    tokenizer = train_bpe(texts, args.vocab_size, max_chars=args.max_chars)
    path = tokenizer.save(args.out)  # creates the directory
    print(f"saved a {tokenizer.vocab_size}-token BPE tokenizer to {path}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from ..data.shards import prepare, val_split_note
    from ..data.tokenizer import get_tokenizer

    summary = prepare(args.spec, get_tokenizer(args.tokenizer), args.out, text_field=args.text_field,
                      val_fraction=args.val_fraction, max_tokens=args.max_tokens)  # fmt: skip
    print(json.dumps(summary, indent=2, default=str))
    if note := val_split_note(args.out):
        print(f"warning: {note}", file=sys.stderr)
    return 0
