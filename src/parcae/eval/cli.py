"""`parcae eval`: validation loss / bits per byte and (with --core) CORE-style accuracy per test-time depth."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from ..cli_types import int_list, name_list, non_negative_int, positive_int


def register(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="loss, bits per byte and CORE accuracy at several test-time depths",
        description="Evaluate a run (latest checkpoint) or a saved model at several test-time depths T.\n"
        "  parcae eval runs/tiny --depths 1,2,4,8,16\n"
        "  parcae eval runs/tiny --depths 1,4,8 --core ../shared/eval/core --max-per-task 20\n"
        "Results go to RUN/eval/: loss_by_depth.json and .png; core.json and core_predictions.jsonl.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("run", metavar="RUN", help="run directory or save_pretrained directory")
    evaluate.add_argument("--depths", type=int_list, help="comma-separated depths (default 1,2,4,…,2·μ_rec)")
    evaluate.add_argument("--seeds", type=positive_int, default=3,
                          help="seeds 0..N-1 for h₀ and CORE few-shot draws; mean ± std (default 3)")  # fmt: skip
    evaluate.add_argument("--data", help="data spec for the loss (default: the run's validation split)")
    evaluate.add_argument("--batches", type=positive_int, default=16, help="validation batches (default 16)")
    evaluate.add_argument("--batch-size", type=positive_int, default=16, help="rows per batch (default 16)")
    evaluate.add_argument("--core", metavar="DIR", help="also run the CORE-style harness on the task files in DIR")
    evaluate.add_argument("--tasks", type=name_list, help="comma-separated CORE tasks (default: all in DIR)")
    evaluate.add_argument("--max-per-task", type=positive_int, metavar="N", help="evaluate N examples per task")
    evaluate.add_argument("--fewshot", type=non_negative_int, metavar="K", help="K demonstrations for every task")
    evaluate.add_argument("--checkpoint", metavar="NAME", help="a checkpoint other than the latest")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..run import open_run
    from ..train.trainer import resolve_device
    from .core import find_tasks, load_task

    if args.core is None and (args.tasks or args.max_per_task or args.fewshot is not None):
        raise ValueError("--tasks, --max-per-task and --fewshot need --core DIR.")
    # Task files are checked before the model is loaded, so a typo fails fast.
    tasks = [load_task(spec, args.core) for spec in find_tasks(args.core, args.tasks)] if args.core else []
    run = open_run(args.run, checkpoint=args.checkpoint, device=resolve_device(args.device))
    cfg = run.config
    depths = args.depths or _default_depths(cfg.mean_recurrence)
    if not cfg.is_looped:
        depths = depths[:1]  # a fixed-depth model has one depth
    out_dir = run.path / "eval"
    out_dir.mkdir(exist_ok=True)
    data_dir = _loss_data(run, args.data, required=not tasks)
    if data_dir is not None:
        _eval_loss(run, data_dir, depths, args, out_dir)
    if tasks:
        _eval_core(run, tasks, depths, args, out_dir)
    return 0


def _loss_data(run: Any, spec: str | None, *, required: bool) -> Path | None:
    """The prepared data for the loss: --data (tokenized once into RUN/eval/, keyed by the spec), else the
    run's own validation split. Without either, None when the loss is optional (CORE-only evaluation)."""
    from ..data.shards import is_prepared, prepare

    if spec:
        if is_prepared(spec):
            return Path(spec)
        # Every document of SPEC is evaluation data (val_fraction 1); one directory per spec, so a
        # second --data never silently reuses the first one's tokens.
        data_dir = run.path / "eval" / f"data-{hashlib.sha1(spec.encode()).hexdigest()[:10]}"
        if not is_prepared(data_dir):
            prepare(spec, run.tokenizer, data_dir, val_fraction=1.0, overwrite=True)
        return data_dir
    train_data = run.train_config.data if run.train_config else None
    for candidate in (train_data, run.path / "data"):
        if candidate and is_prepared(candidate) and (Path(candidate) / "val").is_dir():
            return Path(candidate)
    if required:
        raise FileNotFoundError(f"{run.path} has no validation data; pass --data SPEC (or --core DIR).")
    print(f"note: {run.path} has no validation data (pass --data SPEC); the loss is skipped.")
    return None


def _eval_loss(run: Any, data_dir: Path, depths: list[int], args: argparse.Namespace, out_dir: Path) -> None:
    from ..data.packing import val_batches
    from ..data.shards import ShardStore
    from .loss import format_table, loss_by_depth, plot_depth_curve

    cfg = run.config
    store = ShardStore.open(data_dir, "val")
    seq_len = run.train_config.seq_len if run.train_config and run.train_config.seq_len else cfg.max_seq_len
    batches = list(val_batches(store, seq_len, args.batch_size, args.batches, pad_id=run.tokenizer.pad_id))
    if not batches:
        raise ValueError(f"the validation split of {data_dir} is empty.")
    # A zero h₀ does not depend on the seed: one seed gives the same figures as several.
    seeds = list(range(args.seeds)) if cfg.state_init != "zero" else [0]
    results = loss_by_depth(run.model, batches, depths, state_seed=seeds, token_bytes=run.tokenizer.token_bytes(),
                            progress=not args.no_progress)  # fmt: skip
    first = results[0]
    print(f"{cfg.name} ({run.weights.name}): validation loss on {first.tokens:,} tokens ({first.bytes:,} bytes), "
          f"μ_rec = {cfg.mean_recurrence}, h₀ seeds {_seed_list(seeds)}")  # fmt: skip
    print(format_table(results))
    payload = {"model": cfg.name, "weights": str(run.weights), "data": str(data_dir), "seeds": seeds,
               "results": [r.to_dict() for r in results]}  # fmt: skip
    (out_dir / "loss_by_depth.json").write_text(json.dumps(payload, indent=2) + "\n")
    saved = [out_dir / "loss_by_depth.json"]
    if len(results) > 1:
        plot_depth_curve(results, out_dir / "loss_by_depth.png", f"{cfg.name}: test-time depth",
                         cfg.mean_recurrence)  # fmt: skip
        saved.append(out_dir / "loss_by_depth.png")
    print("saved " + " and ".join(map(str, saved)))


def _eval_core(run: Any, tasks: list, depths: list[int], args: argparse.Namespace, out_dir: Path) -> None:
    from .core import evaluate_core

    seeds = list(range(args.seeds))
    predictions_path = out_dir / "core_predictions.jsonl"
    with predictions_path.open("w", encoding="utf-8") as predictions:
        result = evaluate_core(run.model, run.tokenizer, tasks, depths, seeds=seeds, max_per_task=args.max_per_task,
                               fewshot=args.fewshot, batch_size=args.batch_size, predictions=predictions,
                               progress=not args.no_progress)  # fmt: skip
    per_task = f"at most {args.max_per_task} examples per task" if args.max_per_task else "all examples"
    print(f"\n{run.config.name} ({run.weights.name}): {result.label}, {per_task}, seeds {_seed_list(seeds)}; "
          f"accuracy % (mean over seeds)")  # fmt: skip
    print(result.format_table())
    payload = {"model": run.config.name, "weights": str(run.weights), "core_dir": str(Path(args.core).resolve()),
               **result.to_dict()}  # fmt: skip
    (out_dir / "core.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {out_dir / 'core.json'} and {predictions_path}")


def _seed_list(seeds: list[int]) -> str:
    return ",".join(map(str, seeds))


def _default_depths(mean: int) -> list[int]:
    depths, t = [], 1
    while t <= 2 * mean:
        depths.append(t)
        t *= 2
    return sorted({*depths, mean, 2 * mean})
