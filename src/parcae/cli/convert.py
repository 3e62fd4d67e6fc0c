"""`parcae convert`: official parcae-lm checkpoints (or our runs) → a model directory for every loader."""

import argparse

from ..model.config import STATE_INITS
from .args import Commands, command

DESCRIPTION = """\
Convert a checkpoint for Parcae.from_pretrained, parcae eval/generate and transformers (after import parcae.interop.hf):
  parcae convert --from parcae-lm snapshots/parcae-140m out/parcae-140m
  parcae convert --from run runs/tiny out/tiny
SRC: for parcae-lm, the official config.json + model.safetensors (or shards), pytorch_model.bin or model.pt
(weights_only=True), and optionally tokenizer.json; for run, a training run or a save_pretrained directory."""


def register(commands: Commands) -> None:
    about = "convert an official parcae-lm checkpoint (or a run) into a model directory"
    add = command(commands, "convert", about, DESCRIPTION, handler=cmd_convert).add_argument
    add("source", metavar="SRC", help="checkpoint directory")
    add("destination", metavar="DST", help="output directory (must not exist or be empty)")
    add("--from", dest="kind", required=True, choices=("parcae-lm", "run"), help="what SRC is (required)")
    add("--state-init", choices=STATE_INITS, help="initial loop state (default: the checkpoint's; zero: parity checks)")
    add("--no-tokenizer", action="store_true", help="do not copy SRC's tokenizer")


def cmd_convert(args: argparse.Namespace) -> int:
    from ..interop.hf_directory import convert_checkpoint

    report = convert_checkpoint(
        args.source, args.destination, kind=args.kind, state_init=args.state_init, tokenizer=not args.no_tokenizer
    )
    print(f"{report.summary()}\nwrote {args.destination}")
    return 0
