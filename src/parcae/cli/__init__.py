"""The `parcae` command: a hub that collects subcommands from the modules that implement them.

Each module in `COMMAND_MODULES` has `register(commands)`, which adds its parsers and sets
`handler=` on each; `parcae lab …` experiments register into the `lab` group via `register_lab(lab)`.
Errors a user can cause (bad config, missing data, corrupt checkpoint, a missing optional package, and
argparse's usage errors) print one line `parcae: error: …` and exit with status 2 (1 for a run that
diverged); `--debug` shows the traceback. docs/reliability.md lists what is tested.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

# Modules with `register(commands)`; one line each, so features can be added independently.
COMMAND_MODULES = (
    "parcae.cli.train",
    "parcae.cli.eval",
    "parcae.cli.generate",
    "parcae.cli.data",
    "parcae.cli.convert",
    "parcae.cli.scaling",
)
# Modules with `register_lab(lab)`, adding `parcae lab NAME` experiments.
LAB_MODULES: tuple[str, ...] = ("parcae.cli.lab",)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line too, like every other error (subcommand parsers inherit this class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"parcae: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="parcae",
        description="Parcae: train, evaluate and sample stable looped language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    if LAB_MODULES:
        lab = commands.add_parser("lab", help="experiments: stability, reasoning, …").add_subparsers(
            dest="lab_command", required=True, metavar="EXPERIMENT"
        )
        for name in LAB_MODULES:
            importlib.import_module(name).register_lab(lab)
    presets = commands.add_parser("presets", help="list model presets with their parameter counts")
    presets.set_defaults(handler=cmd_presets)
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
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
