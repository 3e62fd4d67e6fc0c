"""`parcae train`: train a model or resume a run."""

from __future__ import annotations

import argparse
import json

from .args import EPILOG_DATA, non_negative_int, positive_float, positive_int


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a model (or resume a run)",
        description="Train a Parcae model or a baseline. Example:\n"
        "  parcae train --preset parcae-tiny --data stdlib --minutes 5 --out runs/tiny\n"
        "  parcae train --resume runs/tiny            # continue after a stop or crash\n"
        "  parcae train --preset parcae-tiny … --out runs/tiny --overwrite   # afresh; old run → runs/tiny.old-1\n"
        "  torchrun --nproc-per-node 8 -m parcae train --parallel fsdp …   # distributed (docs/distributed.md)",
        epilog=EPILOG_DATA
        + """
--set takes any model field (e.g. mean_recurrence=4, injection=linear) or training field (e.g. lr=3e-3,
optimizer=adamw, eval_every=100, warmup_steps=100); values are parsed as YAML. --list-keys lists them all.

--minutes counts the training loop: its steps and the validations and checkpoints along the way, not the
setup before the first step (tokenizing a raw corpus, building the model) nor the closing validation and
checkpoint (summary.json reports train_seconds and wall_seconds). The run stops before a step that would
overrun the budget with the validation or checkpoint due after it, estimated from the last ones' times.

vocab_size follows the tokenizer (--tokenizer, or the one a prepared --data holds), padded to a multiple of 64,
unless given with --set or --config.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = train.add_mutually_exclusive_group()
    source.add_argument("--preset", help="model preset (see `parcae presets`)")
    source.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its latest checkpoint")
    train.add_argument("--config", metavar="FILE", help="YAML/JSON with optional preset, model and train sections")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (repeatable)")
    train.add_argument(
        "--list-keys", action="store_true",
        help="list every --set key (model and training: type, default, help) and exit; with --preset, its values",
    )  # fmt: skip
    train.add_argument("--data", help="data spec (default: stdlib)")
    train.add_argument("--out", metavar="DIR", help="run directory to create")
    train.add_argument(
        "--overwrite", action="store_true",
        help="if --out already holds a run, rename it to DIR.old-K first (nothing is deleted) and start afresh",
    )  # fmt: skip
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int, help="optimizer steps")
    budget.add_argument("--tokens", type=positive_int, help="training tokens")
    budget.add_argument(
        "--minutes", type=positive_float, help="wall-clock minutes of the training loop (what it counts: below)"
    )
    train.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch and rank (default 16)")
    train.add_argument(
        "--grad-accum", type=positive_int, help="micro-batches per step (global batch = batch × accum × ranks)"
    )
    train.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default: the model's context)")
    train.add_argument(
        "--lr", type=positive_float,
        help="learning rate of the AdamW parameters (default 8e-3). With the default optimizer (Muon + AdamW) that "
        "is the embeddings, head, norms and injection/readout; the attention and MLP matrices take muon_lr "
        "(--set muon_lr=…, default 8e-3). With --set optimizer=adamw, every parameter",
    )  # fmt: skip
    train.add_argument("--tokenizer", help="'byte' (default) or a tokenizer.json / directory")
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="auto (default), cpu, cuda, cuda:N (under torchrun: cuda = cuda:LOCAL_RANK)")
    train.add_argument(
        "--parallel", choices=("ddp", "fsdp"),
        help="under torchrun: ddp (default; replicated) or fsdp (FSDP2, sharded per block); may change on --resume",
    )  # fmt: skip
    train.add_argument("--lockstep", action="store_true", help="every rank draws the same depths and h₀")
    train.add_argument("--checkpoint", metavar="NAME", help="with --resume: a checkpoint other than the latest")
    train.add_argument(
        "--no-progress", action="store_true", help="no progress bar: a one-line status now and then instead"
    )
    train.add_argument(
        "--status-every", type=non_negative_int, default=30, metavar="SECONDS",
        help="with --no-progress: seconds between status lines (step, loss, tokens/s, time; default 30; 0: none)",
    )  # fmt: skip

    train.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.config import TrainConfig, build_configs, fit_vocab_to_tokenizer, list_keys, sets_vocab
    from ..train.trainer import Trainer

    if args.list_keys:
        print(list_keys(args.preset))
        return 0
    status_every = float(args.status_every)
    vocab_note = None
    budget = {k: getattr(args, k) for k in ("steps", "tokens", "minutes") if getattr(args, k) is not None}
    if args.resume:
        if args.overwrite:
            raise ValueError("--overwrite starts a new run; it cannot be combined with --resume.")
        if args.preset or args.config or args.set or args.data or args.out or args.lockstep or args.grad_accum:
            raise ValueError(
                "--resume continues a run as configured; only a new budget and --parallel may be given with it."
            )
        trainer = Trainer(
            None, TrainConfig(**budget) if budget else None, args.resume, resume=True,
            checkpoint=args.checkpoint, progress_bar=not args.no_progress, parallel=args.parallel,
            status_every=status_every,
        )  # fmt: skip
    else:
        if args.checkpoint:
            raise ValueError("--checkpoint only applies with --resume.")
        if not args.out:
            raise ValueError("give the run directory with --out DIR.")
        options = {
            "data": args.data, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
            "tokenizer": args.tokenizer, "seed": args.seed, "device": args.device, "grad_accum": args.grad_accum,
            "parallel": args.parallel, "lockstep": args.lockstep or None, **budget,
        }  # fmt: skip
        model_cfg, train_cfg = build_configs(
            args.preset, args.config, args.set, {k: v for k, v in options.items() if v is not None}
        )
        explicit = sets_vocab(args.config, args.set)
        model_cfg, vocab_note = fit_vocab_to_tokenizer(model_cfg, train_cfg, explicit=explicit)
        trainer = Trainer(
            model_cfg, train_cfg, args.out, progress_bar=not args.no_progress, overwrite=args.overwrite,
            status_every=status_every,
        )  # fmt: skip
    from ..model.parcae import count_params

    main = trainer.dist.is_main  # under torchrun only rank 0 reports
    if main:
        if vocab_note:
            print(vocab_note)
        ranks = f" on {trainer.world_size} ranks ({trainer.config.parallel})" if trainer.dist.enabled else ""
        print(f"model {trainer.model_config.name}: {count_params(trainer.model_config):,} parameters; "
              f"run directory {trainer.run_dir}{ranks}")  # fmt: skip
    summary = trainer.train()
    if main:
        print(json.dumps(summary, indent=2))
    return 0
