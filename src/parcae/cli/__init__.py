"""The `parcae` command: each module in `COMMAND_MODULES` adds its subcommands (with `handler=`) in `register`. A user's
error prints one line `parcae: error: …` and exits 2 (1 for a diverged run); `--debug` shows the traceback."""

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from .args import actions, command

COMMAND_MODULES = ("train", "eval", "generate", "data", "convert", "scaling", "lab")  # each has register(commands)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line too, like every other error (subcommand parsers inherit this class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"parcae: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="parcae", description="Parcae: train, evaluate and sample stable looped language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = actions(parser, "command", "COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(commands)
    command(commands, "presets", "list model presets with their parameter counts", handler=cmd_presets)
    return parser


def cmd_presets(args: argparse.Namespace) -> int:
    from ..model.config import PRESETS, get_preset
    from ..model.parcae import count_params

    print(f"{'preset':<18} {'params':>15}  layers P/R/C  d_model  μ_rec  injection")
    for name in PRESETS:
        cfg = get_preset(name)
        layers = f"{cfg.n_prelude}/{cfg.n_core}/{cfg.n_coda}"
        mean, injection = (cfg.mean_recurrence, cfg.injection) if cfg.is_looped else ("-", "-")
        print(f"{name:<18} {count_params(cfg):>15,}  {layers:>12}  {cfg.d_model:>7}  {mean:>5}  {injection}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("parcae: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; the traceback only with --debug
        if args.debug:
            raise
        from ..train.trainer import TrainingError

        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not isinstance(err, (ValueError, OSError, ImportError, TrainingError)):  # not a user error: likely a bug
            message = f"{type(err).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"parcae: error: {message}", file=sys.stderr)
        return 1 if isinstance(err, TrainingError) else 2
