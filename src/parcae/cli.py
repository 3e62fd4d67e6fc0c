"""The `parcae` command. Each subcommand is a thin layer over the library.

Errors a user can cause (bad config, missing data, corrupt checkpoint, …) print one line
`parcae: error: …` and exit with status 2 (1 for a run that diverged); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EPILOG_DATA = """data specs (--data / SPEC):
  stdlib                         the Python standard library's .py sources (embedded default corpus)
  PATH.txt | PATH.jsonl | PATH.parquet | DIR   local files (jsonl/parquet: --text-field, default "text")
  hf:NAME[:CONFIG][@SPLIT]       a Hugging Face dataset, streamed (needs `pip install parcae-looped[hf]`)
  DIR prepared by `parcae data prepare`   pre-tokenized shards (fastest)
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parcae",
        description="Parcae: train, evaluate and sample stable looped language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # ---- train
    train = commands.add_parser(
        "train",
        help="train a model (or resume a run)",
        description="Train a Parcae model or a baseline. Example:\n"
        "  parcae train --preset parcae-tiny --data stdlib --minutes 5 --out runs/tiny\n"
        "  parcae train --resume runs/tiny            # continue after a stop or crash",
        epilog=EPILOG_DATA + "\n--set takes any model field (e.g. mean_recurrence=4, injection=linear) or training "
        "field (e.g. lr=3e-3, optimizer=adamw, eval_every=100); values are parsed as YAML.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = train.add_mutually_exclusive_group()
    source.add_argument("--preset", help="model preset (see `parcae presets`)")
    source.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its latest checkpoint")
    train.add_argument("--config", metavar="FILE", help="YAML/JSON with optional preset, model and train sections")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (repeatable)")
    train.add_argument("--data", help="data spec (default: stdlib)")
    train.add_argument("--out", metavar="DIR", help="run directory to create")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_positive_int, help="optimizer steps")
    budget.add_argument("--tokens", type=_positive_int, help="training tokens")
    budget.add_argument("--minutes", type=_positive_float, help="training wall-clock minutes")
    train.add_argument("--batch-size", type=_positive_int, help="sequences per micro-batch (default 16)")
    train.add_argument("--seq-len", type=_positive_int, help="tokens per sequence (default: the model's context)")
    train.add_argument("--lr", type=_positive_float, help="AdamW learning rate (default 8e-3)")
    train.add_argument("--tokenizer", help="'byte' (default) or a tokenizer.json / directory")
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    train.add_argument("--checkpoint", metavar="NAME", help="with --resume: a checkpoint other than the latest")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    # ---- eval
    evaluate = commands.add_parser(
        "eval",
        help="validation loss at several test-time depths",
        description="Evaluate a run (latest checkpoint) or a saved model at several test-time depths T.\n"
        "  parcae eval runs/tiny --depths 1,2,4,8,16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("run", metavar="RUN", help="run directory or save_pretrained directory")
    evaluate.add_argument("--depths", type=_int_list, help="comma-separated depths (default 1,2,4,…,2·μ_rec)")
    evaluate.add_argument("--data", help="data spec (default: the run's validation split)")
    evaluate.add_argument("--batches", type=_positive_int, default=16, help="validation batches (default 16)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=16)
    evaluate.add_argument("--checkpoint", metavar="NAME", help="a checkpoint other than the latest")
    evaluate.add_argument("--device", default="auto")

    # ---- generate
    gen = commands.add_parser(
        "generate",
        help="sample text from a model",
        description='Sample a continuation.\n  parcae generate runs/tiny --prompt "def fib(" --steps 8',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("run", metavar="RUN", help="run directory or save_pretrained directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--steps", type=_positive_int, help="test-time depth T (default μ_rec)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=_positive_int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--checkpoint", metavar="NAME")
    gen.add_argument("--device", default="auto")

    # ---- tokenizer train
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
    tok_train.add_argument("--vocab-size", type=_positive_int, required=True)
    tok_train.add_argument("--out", required=True, metavar="DIR")
    tok_train.add_argument("--max-chars", type=_positive_int, help="stop reading after this many characters")
    tok_train.add_argument("--text-field", default="text")

    # ---- data prepare
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
    prep.add_argument("--max-tokens", type=_positive_int, help="stop after this many tokens")

    # ---- presets
    commands.add_parser("presets", help="list model presets with their parameter counts")
    return parser


# ---------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig, build_configs
    from .train.trainer import Trainer

    budget = {k: getattr(args, k) for k in ("steps", "tokens", "minutes") if getattr(args, k) is not None}
    if args.resume:
        if args.preset or args.config or args.set or args.data or args.out:
            raise ValueError("--resume continues a run as configured; only a new budget may be given with it.")
        trainer = Trainer(
            None, TrainConfig(**budget) if budget else None, args.resume, resume=True,
            checkpoint=args.checkpoint, progress_bar=not args.no_progress,
        )  # fmt: skip
    else:
        if args.checkpoint:
            raise ValueError("--checkpoint only applies with --resume.")
        if not args.out:
            raise ValueError("give the run directory with --out DIR.")
        options = {
            "data": args.data, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
            "tokenizer": args.tokenizer, "seed": args.seed, "device": args.device, **budget,
        }  # fmt: skip
        model_cfg, train_cfg = build_configs(
            args.preset, args.config, args.set, {k: v for k, v in options.items() if v is not None}
        )
        trainer = Trainer(model_cfg, train_cfg, args.out, progress_bar=not args.no_progress)
    from .config import count_params

    print(f"model {trainer.model_config.name}: {count_params(trainer.model_config):,} parameters; "
          f"run directory {trainer.run_dir}")  # fmt: skip
    summary = trainer.train()
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data.packing import val_batches
    from .data.shards import ShardStore, is_prepared, prepare
    from .eval.loss import format_table, loss_by_depth, plot_depth_curve
    from .run import open_run
    from .train.trainer import resolve_device

    run = open_run(args.run, checkpoint=args.checkpoint, device=resolve_device(args.device))
    cfg = run.config
    depths = args.depths or _default_depths(cfg.mean_recurrence)
    if not cfg.is_looped:
        depths = depths[:1]
    data_dir = Path(args.data) if args.data and is_prepared(args.data) else None
    if args.data and data_dir is None:
        data_dir = run.path / "eval" / "data"
        if not is_prepared(data_dir):
            prepare(args.data, run.tokenizer, data_dir, val_fraction=0.5)
    elif data_dir is None:
        data_dir = Path(run.train_config.data) if run.train_config and is_prepared(run.train_config.data) else None
        data_dir = data_dir or run.path / "data"
    store = ShardStore.open(data_dir, "val")
    seq_len = run.train_config.seq_len if run.train_config and run.train_config.seq_len else cfg.max_seq_len
    batches = list(val_batches(store, seq_len, args.batch_size, args.batches, pad_id=run.tokenizer.pad_id))
    results = loss_by_depth(run.model, batches, depths)
    tokens = results[0].tokens
    print(f"{cfg.name} ({run.weights.name}): validation loss on {tokens:,} tokens, μ_rec = {cfg.mean_recurrence}")
    print(format_table(results))
    out_dir = run.path / "eval"
    out_dir.mkdir(exist_ok=True)
    payload = {"model": cfg.name, "weights": str(run.weights), "results": [r.to_dict() for r in results]}
    (out_dir / "loss_by_depth.json").write_text(json.dumps(payload, indent=2) + "\n")
    if len(results) > 1:
        plot_depth_curve(results, out_dir / "loss_by_depth.png", f"{cfg.name}: test-time depth",
                         cfg.mean_recurrence)  # fmt: skip
        print(f"saved {out_dir / 'loss_by_depth.json'} and {out_dir / 'loss_by_depth.png'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .infer.generate import generate
    from .run import open_run
    from .train.trainer import resolve_device

    run = open_run(args.run, checkpoint=args.checkpoint, device=resolve_device(args.device))
    tok = run.tokenizer
    prompt = [tok.bos_id, *tok.encode(args.prompt)]
    ids = torch.tensor([prompt], dtype=torch.long)
    out = generate(run.model, ids, args.max_new_tokens, num_steps=args.steps, temperature=args.temperature,
                   top_k=args.top_k, stop_id=tok.bos_id, seed=args.seed, vocab_limit=tok.vocab_size)  # fmt: skip
    new = [t for t in out[0, len(prompt) :].tolist() if t != tok.bos_id]
    print(args.prompt + tok.decode(new))
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from .data.sources import iter_documents
    from .data.tokenizer import train_bpe

    texts = (doc.text for doc in iter_documents(args.data, "train", text_field=args.text_field))
    tokenizer = train_bpe(texts, args.vocab_size, max_chars=args.max_chars)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    print(f"saved a {tokenizer.vocab_size}-token BPE tokenizer to {out / 'tokenizer.json'}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data.shards import prepare
    from .data.tokenizer import get_tokenizer

    summary = prepare(args.spec, get_tokenizer(args.tokenizer), args.out, text_field=args.text_field,
                      val_fraction=args.val_fraction, max_tokens=args.max_tokens)  # fmt: skip
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import PRESETS, count_params, get_preset

    print(f"{'preset':<18} {'params':>15}  layers P/R/C  d_model  μ_rec  injection")
    for name in PRESETS:
        cfg = get_preset(name)
        layers = f"{cfg.n_prelude}/{cfg.n_core}/{cfg.n_coda}"
        mean, injection = (cfg.mean_recurrence, cfg.injection) if cfg.is_looped else ("-", "-")
        print(f"{name:<18} {count_params(cfg):>15,}  {layers:>12}  {cfg.d_model:>7}  {mean:>5}  {injection}")
    return 0


def _default_depths(mean: int) -> list[int]:
    depths, t = [], 1
    while t <= 2 * mean:
        depths.append(t)
        t *= 2
    return sorted({*depths, mean, 2 * mean})


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "tokenizer": cmd_tokenizer,
    "data": cmd_data,
    "presets": cmd_presets,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("parcae: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; the traceback only with --debug
        if args.debug:
            raise
        from .train.trainer import TrainingError

        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not isinstance(err, (ValueError, OSError, TrainingError)):  # not a user error: likely a bug
            message = f"{type(err).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"parcae: error: {message}", file=sys.stderr)
        return 1 if isinstance(err, TrainingError) else 2


if __name__ == "__main__":
    sys.exit(main())
