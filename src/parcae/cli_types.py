"""Argument types and shared help text for the `parcae` command and its subcommand modules."""

from __future__ import annotations

import argparse

EPILOG_DATA = """data specs (--data / SPEC):
  stdlib                         the Python standard library's .py sources (embedded default corpus)
  PATH.txt | PATH.jsonl | PATH.parquet | DIR   local files (jsonl/parquet: --text-field, default "text")
  hf:NAME[:CONFIG][@SPLIT]       a Hugging Face dataset, streamed (needs `pip install parcae-looped[hf]`)
  DIR prepared by `parcae data prepare`   pre-tokenized shards (fastest)
"""


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value
