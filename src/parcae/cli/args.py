"""Argument types, parser helpers and shared help text for the `parcae` subcommand modules."""

import argparse
from contextlib import suppress
from functools import partial
from typing import Any

Commands = argparse._SubParsersAction

EPILOG_DATA = """data specs (--data / SPEC):
  stdlib                         the Python standard library's .py sources (embedded default corpus)
  PATH.txt | PATH.jsonl | PATH.parquet | DIR   local files (jsonl/parquet: --text-field, default "text")
  hf:NAME[:CONFIG][@SPLIT]       a Hugging Face dataset, streamed (needs `pip install parcae-looped[hf]`)
  DIR prepared by `parcae data prepare`   pre-tokenized shards (fastest)
"""


def command(
    commands: Commands, name: str, help: str, description: str | None = None, *, handler: Any = None, **kw: Any
) -> argparse.ArgumentParser:
    """A subcommand parser run by `handler(args)`; its description and epilog keep their line breaks (examples)."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = commands.add_parser(name, help=help, description=description, formatter_class=raw, **kw)
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


def actions(parser: argparse.ArgumentParser, dest: str, metavar: str = "ACTION") -> Commands:
    """The sub-actions of a command (`parcae data prepare`), one of which must be given."""
    return parser.add_subparsers(dest=dest, required=True, metavar=metavar)


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among `names` that the user gave: the others keep the config's defaults."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _list(text: str, cast: type, kind: str, example: str = "", positive: bool = True) -> list[Any]:
    """The comma-separated items of `text` (blank ones skipped), each `cast` and, for numbers, positive."""
    values: list[Any] = []
    with suppress(ValueError):
        values = [cast(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind}{example}, got {text!r}")
    if positive and any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive {kind}, got {text!r}")
    return values


def _number(text: str, cast: type, kind: str, above: int = 0) -> Any:
    """`cast(text)` if it exceeds `above` (a NaN does not), else a usage error."""
    with suppress(ValueError):
        value = cast(text)
        if value > above:
            return value
    raise argparse.ArgumentTypeError(f"expected a {kind}, got {text!r}")


name_list = partial(_list, cast=str, kind="names", positive=False)
int_list = partial(_list, cast=int, kind="integers")
float_list = partial(_list, cast=float, kind="numbers", example=" (e.g. 1e15,2e15)")  # learning rates, FLOP budgets
positive_int = partial(_number, cast=int, kind="positive integer")
non_negative_int = partial(_number, cast=int, kind="non-negative integer", above=-1)
positive_float = partial(_number, cast=float, kind="positive number")
