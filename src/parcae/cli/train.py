"""`parcae train`: train a model or resume a run."""

import argparse
import json

from .args import EPILOG_DATA, Commands, command, given, non_negative_int, positive_float, positive_int

DESCRIPTION = """\
Train a Parcae model or a baseline. Example:
  parcae train --preset parcae-tiny --data stdlib --minutes 5 --out runs/tiny
  parcae train --resume runs/tiny            # continue after a stop or crash
  parcae train --preset parcae-tiny … --out runs/tiny --overwrite   # afresh; old run → runs/tiny.old-1
  torchrun --nproc-per-node 8 -m parcae train --parallel fsdp …   # distributed (docs/distributed.md)"""

EPILOG = """
--set takes any model or training field (e.g. mean_recurrence=4, lr=3e-3), parsed as YAML; --list-keys lists them.
--minutes times the training loop with its validations and checkpoints (not the setup, nor the closing validation
and checkpoint): no step starts that would overrun it with the validation or checkpoint due after it.
vocab_size follows the tokenizer (--tokenizer, or a prepared --data's), padded to a multiple of 64, unless given
with --set or --config."""


def register(commands: Commands) -> None:
    about = "train a model (or resume a run)"
    train = command(commands, "train", about, DESCRIPTION, epilog=EPILOG_DATA + EPILOG, handler=cmd_train)
    source = train.add_mutually_exclusive_group()
    source.add_argument("--preset", help="model preset (see `parcae presets`)")
    source.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its latest checkpoint")
    add = train.add_argument
    add("--config", metavar="FILE", help="YAML/JSON with optional preset, model and train sections")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (repeatable)")
    add("--list-keys", action="store_true", help="list every --set key: type, default (with --preset, its value), help")
    add("--data", help="data spec (default: stdlib)")
    add("--out", metavar="DIR", help="run directory to create")
    add("--overwrite", action="store_true", help="rename a run already in --out to DIR.old-K (nothing is deleted) "
        "and start afresh")  # fmt: skip
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int, help="optimizer steps")
    budget.add_argument("--tokens", type=positive_int, help="training tokens")
    budget.add_argument("--minutes", type=positive_float, help="wall-clock minutes of the training loop (see below)")
    add("--batch-size", type=positive_int, help="sequences per micro-batch and rank (default 16)")
    add("--grad-accum", type=positive_int, help="micro-batches per step (global batch = batch × accum × ranks)")
    add("--seq-len", type=positive_int, help="tokens per sequence (default: the model's context)")
    add("--lr", type=positive_float, help="learning rate of the AdamW parameters (default 8e-3): with Muon + AdamW "
        "(default) the embeddings, head, norms and injection/readout, the attention and MLP matrices taking muon_lr "
        "(--set muon_lr=…, default 8e-3); with --set optimizer=adamw, every parameter")  # fmt: skip
    add("--tokenizer", help="'byte' (default) or a tokenizer.json / directory")
    add("--seed", type=int)
    add("--device", help="auto (default), cpu, cuda, cuda:N (under torchrun: cuda = cuda:LOCAL_RANK)")
    add("--parallel", choices=("ddp", "fsdp"), help="under torchrun: ddp (default; replicated) or fsdp (FSDP2, "
        "sharded per block); may change on --resume")  # fmt: skip
    add("--lockstep", action="store_true", help="every rank draws the same depths and h₀")
    add("--checkpoint", metavar="NAME", help="with --resume: a checkpoint other than the latest")
    add("--no-progress", action="store_true", help="no progress bar: a one-line status now and then instead")
    add("--status-every", type=non_negative_int, default=30, metavar="SECONDS", help="with --no-progress: seconds "
        "between status lines (step, loss, tokens/s, time; default 30; 0: none)")  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from ..model.parcae import count_params
    from ..train.config import TrainConfig, build_configs, fit_vocab_to_tokenizer, list_keys, sets_vocab
    from ..train.trainer import Trainer

    if args.list_keys:
        print(list_keys(args.preset))
        return 0
    # --parallel overrides the config's on --resume and repeats it otherwise.
    shared = {"progress_bar": not args.no_progress, "status_every": float(args.status_every), "parallel": args.parallel}
    vocab_note = None
    budget = given(args, "steps", "tokens", "minutes")
    if args.resume:
        if args.overwrite:
            raise ValueError("--overwrite starts a new run; it cannot be combined with --resume.")
        fixed = ("preset", "config", "set", "data", "out", "lockstep", "grad_accum", "batch_size", "seq_len", "lr")
        refused = [name for name in (*fixed, "tokenizer", "seed", "device") if getattr(args, name)]
        if refused:  # silently ignoring them would train on other settings than the user asked for
            flags = ", ".join("--" + name.replace("_", "-") for name in refused)
            raise ValueError(f"--resume keeps the settings: only a new budget and --parallel may change, not {flags}.")
        train_cfg = TrainConfig(**budget) if budget else None
        trainer = Trainer(None, train_cfg, args.resume, resume=True, checkpoint=args.checkpoint, **shared)
    else:
        if args.checkpoint:
            raise ValueError("--checkpoint only applies with --resume.")
        if not args.out:
            raise ValueError("give the run directory with --out DIR.")
        names = ("data", "batch_size", "seq_len", "lr", "tokenizer", "seed", "device", "grad_accum", "parallel")
        options = {**given(args, *names), **budget}
        if args.lockstep:  # only a given flag overrides a config file's lockstep
            options["lockstep"] = True
        model_cfg, train_cfg = build_configs(args.preset, args.config, args.set, options)
        model_cfg, vocab_note = fit_vocab_to_tokenizer(model_cfg, train_cfg, explicit=sets_vocab(args.config, args.set))
        trainer = Trainer(model_cfg, train_cfg, args.out, overwrite=args.overwrite, **shared)
    main = trainer.dist.is_main  # under torchrun only rank 0 reports
    if main:
        if vocab_note:
            print(vocab_note)
        ranks = f" on {trainer.world_size} ranks ({trainer.config.parallel})" if trainer.dist.enabled else ""
        params = count_params(trainer.model_config)
        print(f"model {trainer.model_config.name}: {params:,} parameters; run directory {trainer.run_dir}{ranks}")
    summary = trainer.train()
    if main:
        print(json.dumps(summary, indent=2))
    return 0
