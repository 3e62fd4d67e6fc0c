"""`parcae eval`: validation loss at several test-time depths."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli_types import int_list, positive_int


def register(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="validation loss at several test-time depths",
        description="Evaluate a run (latest checkpoint) or a saved model at several test-time depths T.\n"
        "  parcae eval runs/tiny --depths 1,2,4,8,16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("run", metavar="RUN", help="run directory or save_pretrained directory")
    evaluate.add_argument("--depths", type=int_list, help="comma-separated depths (default 1,2,4,…,2·μ_rec)")
    evaluate.add_argument("--data", help="data spec (default: the run's validation split)")
    evaluate.add_argument("--batches", type=positive_int, default=16, help="validation batches (default 16)")
    evaluate.add_argument("--batch-size", type=positive_int, default=16)
    evaluate.add_argument("--checkpoint", metavar="NAME", help="a checkpoint other than the latest")
    evaluate.add_argument("--device", default="auto")

    evaluate.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data.packing import val_batches
    from ..data.shards import ShardStore, is_prepared, prepare
    from ..run import open_run
    from ..train.trainer import resolve_device
    from .loss import format_table, loss_by_depth, plot_depth_curve

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


def _default_depths(mean: int) -> list[int]:
    depths, t = [], 1
    while t <= 2 * mean:
        depths.append(t)
        t *= 2
    return sorted({*depths, mean, 2 * mean})
