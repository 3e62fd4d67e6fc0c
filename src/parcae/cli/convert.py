"""`parcae convert`: official parcae-lm checkpoints (or our runs) → a model directory for every loader."""

from __future__ import annotations

import argparse

from ..model.config import STATE_INITS


def register(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser(
        "convert",
        help="convert an official parcae-lm checkpoint (or a run) into a model directory",
        description="Convert a checkpoint into a directory that Parcae.from_pretrained, `parcae eval/generate` and\n"
        "transformers' AutoModelForCausalLM / AutoTokenizer (after `import parcae.interop.hf`) all load.\n"
        "  parcae convert --from parcae-lm snapshots/parcae-140m out/parcae-140m\n"
        "  parcae convert --from run runs/tiny out/tiny\n"
        "SRC for parcae-lm: a directory with the official config.json and model.safetensors (or shards),\n"
        "pytorch_model.bin or model.pt (read with weights_only=True), and optionally tokenizer.json.\n"
        "SRC for run: a training run or a save_pretrained directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("source", metavar="SRC", help="checkpoint directory")
    convert.add_argument("destination", metavar="DST", help="output directory (must not exist or be empty)")
    convert.add_argument(
        "--from", dest="kind", required=True, choices=("parcae-lm", "run"), help="what SRC is (required)"
    )
    convert.add_argument(
        "--state-init",
        choices=STATE_INITS,
        help="initial loop state of the converted model (default: the checkpoint's; 'zero' for parity checks)",
    )
    convert.add_argument("--no-tokenizer", action="store_true", help="do not copy SRC's tokenizer")
    convert.set_defaults(handler=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from ..interop.official import convert_checkpoint

    report = convert_checkpoint(
        args.source, args.destination, kind=args.kind, state_init=args.state_init, tokenizer=not args.no_tokenizer
    )
    print(report.summary())
    print(f"wrote {args.destination}")
    return 0
