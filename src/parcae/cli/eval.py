"""`parcae eval` (loss, bits per byte and CORE-style accuracy per test-time depth) and `parcae core` (its tasks)."""

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from ..eval.bundle import BUNDLE_SHA256, BUNDLE_URL, resolve_core_dir
from ..eval.scoring import seed_changes_h0
from .args import Commands, actions, command, int_list, name_list, non_negative_int, positive_float, positive_int

DESCRIPTION = """\
Evaluate a run (latest checkpoint) or a saved model at several test-time depths T.
  parcae eval runs/tiny --depths 1,2,4,8,16
  parcae eval runs/tiny --depths 1,4,8 --core DIR --max-per-task 20
Compare figures only at equal settings (each table's header states them, the JSON records them). A looped model
with a random h₀ is scored once per seed (mean ± std); other models' loss once (CORE still draws few-shot examples
per seed). Results go to RUN/eval/, named by checkpoint and settings hash, so no evaluation replaces another's:
  loss-<checkpoint>-<hash>.json (+ .png)    core-<checkpoint>-<hash>.json (+ .predictions.jsonl)"""

CORE_DESCRIPTION = """\
The CORE task files for `parcae eval RUN --core`, from the public DCLM eval bundle.
  parcae core download                           # fetch, verify, install into the cache
  parcae core download --from eval_bundle.zip    # offline: install a local copy of the bundle
  parcae core path                               # print the cache folder (verified)
  parcae eval runs/tiny --core --max-per-task 20 # evaluate on the cached tasks (CORE-18)"""

DOWNLOAD_DESCRIPTION = f"""\
Install the CORE task files of {BUNDLE_URL} into DIR.
Verified: the zip's sha256 (as public projects record it, unconfirmed by us; --sha256 pins another), each file's CRC-32
and CORE format, and on every use its sha256 (DIR/manifest.json). HellaSwag, SQuAD, CoQA go to DIR/extra (0-shot)."""


def register(commands: Commands) -> None:
    about = "loss, bits per byte and CORE accuracy at several test-time depths"
    add = command(commands, "eval", about, DESCRIPTION, handler=cmd_eval).add_argument
    add("run", metavar="RUN", help="run directory or save_pretrained directory")
    add("--depths", type=int_list, help="comma-separated depths (default 1,2,4,…,2·μ_rec)")
    add("--seeds", type=positive_int, help="seeds 0..N-1 of h₀ and few-shot draws (default 3 if h₀ is random, else 1)")
    add("--data", metavar="SPEC", help="loss text: the run's data (default; its --split) or another SPEC, scored whole")
    add("--split", choices=("val", "train"), default="val", help="val (held out, default) or train (not held out)")
    add("--batches", type=positive_int, default=16, help="at most N loss batches (default 16)")
    add("--batch-size", type=positive_int, default=16, help="rows per batch (default 16)")
    add("--core", nargs="?", const="cached", metavar="DIR", help="also run the CORE-style harness on the task files "
        "in DIR; no DIR (or 'cached'): the verified cache of `parcae core download`")  # fmt: skip
    add("--tasks", type=name_list, help="comma-separated CORE tasks (default: all in DIR)")
    add("--max-per-task", type=positive_int, metavar="N", help="evaluate N examples per task")
    add("--fewshot", type=non_negative_int, metavar="K", help="K demonstrations for every task")
    add("--checkpoint", metavar="NAME", help="a checkpoint other than the latest")
    add("--device", default="auto")
    add("--threads", type=positive_int, help="torch CPU threads (default: all cores); on a busy CPU 1 is often faster")
    add("--no-progress", action="store_true", help="no progress bars")

    parser = command(commands, "core", "download and cache the CORE task files (DCLM eval bundle)", CORE_DESCRIPTION)
    core = actions(parser, "core_command")
    about = "download (or --from a local copy), verify and install the task files; a no-op when verified"
    add = command(core, "download", about, DOWNLOAD_DESCRIPTION, handler=cmd_download).add_argument
    add("--from", dest="source_zip", metavar="ZIP", help="install from a local eval_bundle.zip")
    add("--dir", metavar="DIR", help="install here (default $PARCAE_CACHE/core or ~/.cache/parcae/core)")
    add("--sha256", metavar="HEX", help=f"expected sha256 of the zip (default {BUNDLE_SHA256[:12]}…)")
    add("--url", default=BUNDLE_URL, help="download from this URL instead (a mirror)")
    add("--force", action="store_true", help="reinstall even if DIR verifies")
    add("--timeout", type=positive_float, default=60.0, help="network timeout in seconds (default 60)")
    add("--no-progress", action="store_true", help="no progress bar")
    about = "print the folder of the installed task files (after verifying them)"
    path = command(core, "path", about, handler=cmd_path)
    path.add_argument("--dir", metavar="DIR", help="check this folder instead of the cache")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..device import resolve_device
    from ..eval.core import find_tasks, load_task
    from ..train.run import open_run

    if args.core is None and (args.tasks or args.max_per_task or args.fewshot is not None):
        raise ValueError("--tasks, --max-per-task and --fewshot need --core DIR.")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    core_dir = resolve_core_dir(args.core) if args.core is not None else None
    # Task files are checked before the model is loaded, so a typo fails fast.
    tasks = [load_task(spec, core_dir) for spec in find_tasks(core_dir, args.tasks)] if core_dir else []
    run = open_run(args.run, checkpoint=args.checkpoint, device=resolve_device(args.device))
    mean = run.config.mean_recurrence
    # Default: the powers of two up to 2·μ_rec, and μ_rec itself; a fixed-depth model has one depth.
    depths = args.depths or sorted({1 << i for i in range((2 * mean).bit_length())} | {mean, 2 * mean})
    depths = depths if run.config.is_looped else depths[:1]
    (run.path / "eval").mkdir(exist_ok=True)
    data = _loss_data(run, args.data, args.split, required=not tasks)
    if data is not None:
        _eval_loss(run, data, depths, args)
    if core_dir is not None:
        _eval_core(run, tasks, core_dir, depths, args)
    return 0


def _output(kind: str, run: Any, settings: dict[str, Any]) -> str:
    """`RUN/eval/<kind>-<checkpoint>-<hash of settings>` (each output adds a suffix): one per distinct evaluation."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return str(run.path / "eval" / f"{kind}-{run.weights.name}-{digest}")


class LossData(NamedTuple):  # the split scored for the loss and how to describe it
    directory: Path  # a prepared data directory
    split: str  # "val" or "train"
    label: str  # what was scored, in words (the header and the JSON)
    source: str  # the data spec, or "run" for the run's own data (in the settings hash: the file name)


def _loss_data(run: Any, spec: str | None, split: str, *, required: bool) -> LossData | None:
    """What the loss scores: `split` of the run's own data (by default, or when --data names it), or every
    document of another SPEC. None (with a note) when there is none and the loss is optional (with CORE)."""
    from ..data.shards import is_prepared, val_split_note

    training = run.train_config.data if run.train_config else None
    same = training and os.path.exists(spec or "") and os.path.exists(training) and os.path.samefile(spec, training)
    if spec and not (spec == training or same):  # another SPEC: a prepared one's split, else all of it
        outside = " (not the run's data)" if run.train_config else ""
        if is_prepared(spec):
            return LossData(Path(spec), split, f"the {split} split of prepared {spec}{outside}", spec)
        if split == "train":
            raise ValueError(f"--split train scores the run's own training split; {spec} is not the run's data, "
                             "and every document of it is scored already.")  # fmt: skip
        label = f"all of {spec}" + (" (not the run's split)" if run.train_config else "")
        return LossData(_tokenized(run, spec, 1.0, "text"), "val", label, spec)  # val_fraction 1: every document
    own = next((Path(path) for path in (training, run.path / "data") if path and is_prepared(path)), None)
    source = "run"
    if own is None and spec:  # the run's tokenized data is gone: split its spec again the way training did
        own = _tokenized(run, spec, run.train_config.val_fraction, run.train_config.text_field)
        print(f"note: {run.path} no longer holds its tokenized data; {spec} was tokenized again with the run's "
              f"val_fraction {run.train_config.val_fraction} into {own} (the run's split unless the data code "
              "changed since training).")  # fmt: skip
        source = f"run, tokenized again: {spec}"
    if own is None:
        message = f"{run.path} has no {'validation' if split == 'val' else 'training'} data; pass --data SPEC"
        if required:
            raise FileNotFoundError(message + " (or --core DIR).")
        print(f"note: {message}; the loss is skipped.")
        return None
    note = val_split_note(own) if split == "val" else None
    if note is not None:
        message = (f"{note} For `parcae eval`: --data SPEC scores other text, --split train scores the run's "
                   "training split (reported as training data, not held out).")  # fmt: skip
        if required:
            raise ValueError(message)
        print(f"note: {message} The loss is skipped.")
        return None
    part = "held-out validation split" if split == "val" else "training split"
    if spec:
        print(f"note: {spec} is the run's training data: scoring its {part} ({own / split}), not all of it.")
    # A saved model without a training config names the data folder it holds.
    ending = ")" if split == "val" else "; training data, not held out)"
    return LossData(own, split, f"the {part} of the run's data ({training or own}{ending}", source)


def _tokenized(run: Any, spec: str, val_fraction: float, text_field: str) -> Path:
    """SPEC tokenized once into RUN/eval/, one directory per (spec, split settings): never another --data's tokens."""
    from ..data.shards import is_prepared, prepare

    key = json.dumps([spec, val_fraction, text_field])
    data_dir = run.path / "eval" / f"data-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if not is_prepared(data_dir):
        prepare(spec, run.tokenizer, data_dir, text_field=text_field, val_fraction=val_fraction, overwrite=True)
    return data_dir


def _eval_loss(run: Any, data: LossData, depths: list[int], args: argparse.Namespace) -> None:
    from ..data.packing import val_batches
    from ..data.shards import ShardStore
    from ..eval.loss import format_table, loss_by_depth, plot_depth_curve

    cfg = run.config
    store = ShardStore.open(data.directory, data.split)
    seq_len = (run.train_config and run.train_config.seq_len) or cfg.max_seq_len
    batches = list(val_batches(store, seq_len, args.batch_size, args.batches, pad_id=run.tokenizer.pad_id))
    if not batches:
        raise ValueError(f"the {data.split} split of {data.directory} is empty.")
    if seed_changes_h0(cfg):
        seeds = list(range(3 if args.seeds is None else args.seeds))
        seed_words = f"h₀ seeds {','.join(map(str, seeds))}" + (" (mean ± std)" if len(seeds) > 1 else "")
    else:  # h₀ does not depend on the seed: one pass
        reason = "a fixed-depth model has no h₀" if not cfg.is_looped else "h₀ = 0 (state_init zero)"
        ignored = f"; --seeds {args.seeds} would repeat it" if args.seeds and args.seeds > 1 else ""
        seeds, seed_words = [0], f"one pass: {reason}, so the seed changes nothing{ignored}"
    results = loss_by_depth(run.model, batches, depths, state_seed=seeds, token_bytes=run.tokenizer.token_bytes(),
                            progress=not args.no_progress)  # fmt: skip
    first = results[0]
    fewer = f" (all the split holds; --batches {args.batches})" if len(batches) < args.batches else ""
    shape = f"{len(batches)} batches{fewer} × {args.batch_size} rows × {seq_len} tokens"
    loop = f", μ_rec = {cfg.mean_recurrence}" if cfg.is_looped else ", fixed depth"
    print(f"{cfg.name} ({run.weights.name}){loop}: loss on {data.label}: {shape}, "
          f"{first.tokens:,} target tokens ({first.bytes:,} bytes); {seed_words}")  # fmt: skip
    print(format_table(results))
    settings = {"data": data.source, "split": data.split, "batches": args.batches, "batch_size": args.batch_size,
                "seq_len": seq_len, "depths": depths, "seeds": seeds}  # fmt: skip
    name = _output("loss", run, settings)
    payload = {"model": cfg.name, "weights": str(run.weights), "data": data.label,
               "data_path": str(data.directory / data.split), "split": data.split, "batches": len(batches),
               "batch_size": args.batch_size, "seq_len": seq_len, "tokens": first.tokens, "bytes": first.bytes,
               "seeds": seeds, "seed_note": seed_words, "settings": settings,
               "results": [r.to_dict() for r in results]}  # fmt: skip
    Path(f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    if len(results) > 1:
        plot_depth_curve(results, f"{name}.png", f"{cfg.name}: test-time depth", cfg.mean_recurrence)
    print(f"saved {name}.json" + (f" and {name}.png" if len(results) > 1 else ""))


def _eval_core(run: Any, tasks: list, core_dir: Path, depths: list[int], args: argparse.Namespace) -> None:
    from ..eval.core import evaluate_core

    h0 = seed_changes_h0(run.config)
    seeds = list(range(args.seeds if args.seeds is not None else 3 if h0 else 1))
    settings = {"core": str(core_dir.resolve()), "tasks": [t.name for t in tasks], "max_per_task": args.max_per_task,
                "fewshot": args.fewshot, "depths": depths, "seeds": seeds}  # fmt: skip
    name = _output("core", run, settings)
    predictions_path = Path(f"{name}.predictions.jsonl")
    partial = Path(f"{predictions_path}.partial")  # an interrupted run keeps the old file
    with partial.open("w", encoding="utf-8") as predictions:
        result = evaluate_core(run.model, run.tokenizer, tasks, depths, seeds=seeds, max_per_task=args.max_per_task,
                               fewshot=args.fewshot, batch_size=args.batch_size, predictions=predictions,
                               progress=not args.no_progress)  # fmt: skip
    partial.replace(predictions_path)
    per_task = f"at most {args.max_per_task} examples per task" if args.max_per_task else "all examples"
    what = "few-shot draw and h₀" if h0 else "few-shot draw; this model's h₀ does not depend on it"
    print(f"\n{run.config.name} ({run.weights.name}): {result.label} from {core_dir}, {per_task}, "
          f"seeds {','.join(map(str, seeds))} ({what}); accuracy % (mean over seeds)")  # fmt: skip
    print(result.format_table())
    payload = {"model": run.config.name, "weights": str(run.weights), "settings": settings, **result.to_dict()}
    Path(f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {name}.json and {predictions_path}")


def cmd_download(args: argparse.Namespace) -> int:
    from ..eval.bundle import download

    download(args.dir, source_zip=args.source_zip, url=args.url, sha256=args.sha256, force=args.force,
             timeout=args.timeout, progress=not args.no_progress)  # fmt: skip
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    from ..eval.bundle import default_dir, verify

    directory = Path(args.dir) if args.dir else default_dir()
    verify(directory)
    print(directory)
    return 0
