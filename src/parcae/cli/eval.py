"""`parcae eval`: validation loss / bits per byte and (with --core) CORE-style accuracy per test-time depth."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..eval.bundle import BUNDLE_SHA256, BUNDLE_URL, resolve_core_dir
from ..eval.scoring import seed_changes_h0
from .args import int_list, name_list, non_negative_int, positive_float, positive_int

DESCRIPTION = """\
Evaluate a run (latest checkpoint) or a saved model at several test-time depths T.
  parcae eval runs/tiny --depths 1,2,4,8,16
  parcae eval runs/tiny --depths 1,4,8 --core DIR --max-per-task 20

The figures depend on what was scored, so compare them only at the same settings: for the loss the
data (which split, --batches × --batch-size rows × the run's seq_len tokens) and the h₀ seeds; for CORE
the tasks, --max-per-task, --fewshot and the seeds. Each table's header states them, the JSON records them.
Seeds: a looped model with a random h₀ is scored once per seed (mean ± std); a fixed-depth model or a zero
h₀ does not depend on the seed, so the loss is scored once (CORE still draws few-shot examples per seed).

Results go to RUN/eval/, named by the checkpoint and a hash of the settings above, so one evaluation never
replaces another's (the same settings again replace their own files):
  loss-<checkpoint>-<hash>.json (+ .png)    core-<checkpoint>-<hash>.json (+ .predictions.jsonl)"""


def register(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="loss, bits per byte and CORE accuracy at several test-time depths",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("run", metavar="RUN", help="run directory or save_pretrained directory")
    evaluate.add_argument("--depths", type=int_list, help="comma-separated depths (default 1,2,4,…,2·μ_rec)")
    evaluate.add_argument("--seeds", type=positive_int,
                          help="seeds 0..N-1 for h₀ and CORE few-shot draws; mean ± std (default 3 for a looped "
                               "model with a random h₀, else 1)")  # fmt: skip
    evaluate.add_argument("--data", metavar="SPEC",
                          help="text for the loss (default: the run's data). The run's own training data scores "
                               "its held-out split; any other SPEC is scored whole")  # fmt: skip
    evaluate.add_argument("--split", choices=("val", "train"), default="val",
                          help="which split of the run's data: val (held out, default) or train (the training "
                               "data, not held out)")  # fmt: skip
    evaluate.add_argument("--batches", type=positive_int, default=16, help="at most N loss batches (default 16)")
    evaluate.add_argument("--batch-size", type=positive_int, default=16, help="rows per batch (default 16)")
    evaluate.add_argument("--core", nargs="?", const="cached", metavar="DIR",
                          help="also run the CORE-style harness on the task files in DIR; no DIR (or 'cached'): "
                               "the verified cache of `parcae core download`")  # fmt: skip
    evaluate.add_argument("--tasks", type=name_list, help="comma-separated CORE tasks (default: all in DIR)")
    evaluate.add_argument("--max-per-task", type=positive_int, metavar="N", help="evaluate N examples per task")
    evaluate.add_argument("--fewshot", type=non_negative_int, metavar="K", help="K demonstrations for every task")
    evaluate.add_argument("--checkpoint", metavar="NAME", help="a checkpoint other than the latest")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--threads", type=positive_int,
                          help="CPU threads for torch (default: torch's, one per core); on a machine busy with other "
                               "work, 1 is often several times faster")  # fmt: skip
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate.set_defaults(handler=cmd_eval)
    _register_core(commands)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..device import resolve_device
    from ..eval.core import find_tasks, load_task
    from ..train.run import open_run

    if args.core is None and (args.tasks or args.max_per_task or args.fewshot is not None):
        raise ValueError("--tasks, --max-per-task and --fewshot need --core DIR.")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # --core alone: the verified cache of `parcae core download`; --core DIR: a folder of task files
    core_dir = resolve_core_dir(args.core) if args.core is not None else None
    # Task files are checked before the model is loaded, so a typo fails fast.
    tasks = [load_task(spec, core_dir) for spec in find_tasks(core_dir, args.tasks)] if core_dir else []
    run = open_run(args.run, checkpoint=args.checkpoint, device=resolve_device(args.device))
    cfg = run.config
    depths = args.depths or _default_depths(cfg.mean_recurrence)
    if not cfg.is_looped:
        depths = depths[:1]  # a fixed-depth model has one depth
    out_dir = run.path / "eval"
    out_dir.mkdir(exist_ok=True)
    data = _loss_data(run, args.data, args.split, required=not tasks)
    if data is not None:
        _eval_loss(run, data, depths, args, out_dir)
    if core_dir is not None:
        _eval_core(run, tasks, core_dir, depths, args, out_dir)
    return 0


# ---------------------------------------------------------------------------------------------- seeds
def _seeds_for_loss(cfg: Any, requested: int | None) -> tuple[list[int], str]:
    """(seeds, how they are described): one pass when h₀ does not depend on the seed."""
    if seed_changes_h0(cfg):
        seeds = list(range(3 if requested is None else requested))
        return seeds, f"h₀ seeds {_seed_list(seeds)}" + (" (mean ± std)" if len(seeds) > 1 else "")
    reason = "a fixed-depth model has no h₀" if not cfg.is_looped else "h₀ = 0 (state_init zero)"
    ignored = f"; --seeds {requested} would repeat it" if requested and requested > 1 else ""
    return [0], f"one pass: {reason}, so the seed changes nothing{ignored}"


def _seed_list(seeds: list[int]) -> str:
    return ",".join(map(str, seeds))


def _settings_name(kind: str, run: Any, settings: dict[str, Any]) -> str:
    """`<kind>-<checkpoint>-<hash of settings>`: a file name per distinct evaluation."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{kind}-{run.weights.name}-{digest}"


# ---------------------------------------------------------------------------------------------- loss data
@dataclass(frozen=True)
class LossData:
    """The split scored for the loss and how to describe it."""

    directory: Path  # a prepared data directory
    split: str  # "val" or "train"
    label: str  # what was scored, in words (the header and the JSON)
    source: str  # the data spec, or "run" for the run's own data (in the settings hash: the file name)


def _loss_data(run: Any, spec: str | None, split: str, *, required: bool) -> LossData | None:
    """What the loss scores: the run's own data (by default, or when --data names the run's training data) in
    the requested split, or every document of another SPEC. None (with a note) when there is none and the loss
    is optional (a CORE evaluation)."""
    if spec and not _is_run_data(run, spec):
        return _other_data(run, spec, split)
    own, source = _run_data_dir(run), "run"
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
    if split == "val":
        from ..data.shards import val_split_note

        note = val_split_note(own)
        if note is not None:
            message = (f"{note} For `parcae eval`: --data SPEC scores other text, --split train scores the run's "
                       "training split (reported as training data, not held out).")  # fmt: skip
            if required:
                raise ValueError(message)
            print(f"note: {message} The loss is skipped.")
            return None
    training = run.train_config.data
    part = "held-out validation split" if split == "val" else "training split"
    if spec:
        print(f"note: {spec} is the run's training data: scoring its {part} ({own / split}), not all of it.")
    label = f"the {part} of the run's data ({training}" + (")" if split == "val" else "; training data, not held out)")
    return LossData(own, split, label, source)


def _other_data(run: Any, spec: str, split: str) -> LossData:
    from ..data.shards import is_prepared

    outside = " (not the run's data)" if run.train_config else ""
    if is_prepared(spec):
        return LossData(Path(spec), split, f"the {split} split of prepared {spec}{outside}", spec)
    if split == "train":
        raise ValueError(f"--split train scores the run's own training split; {spec} is not the run's data, and "
                         "every document of it is scored already.")  # fmt: skip
    # Every document of SPEC is evaluation data (val_fraction 1).
    label = f"all of {spec}" + (" (not the run's split)" if run.train_config else "")
    return LossData(_tokenized(run, spec, 1.0, "text"), "val", label, spec)


def _tokenized(run: Any, spec: str, val_fraction: float, text_field: str) -> Path:
    """SPEC tokenized once into RUN/eval/, one directory per (spec, split settings): a second --data never
    silently reuses the first one's tokens."""
    from ..data.shards import is_prepared, prepare

    key = json.dumps([spec, val_fraction, text_field])
    data_dir = run.path / "eval" / f"data-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if not is_prepared(data_dir):
        prepare(spec, run.tokenizer, data_dir, text_field=text_field, val_fraction=val_fraction, overwrite=True)
    return data_dir


def _is_run_data(run: Any, spec: str) -> bool:
    """Whether SPEC names the data the run trained on: the same spec string or the same file or directory."""
    training = run.train_config.data if run.train_config else None
    if not training:
        return False
    if spec == training:
        return True
    return os.path.exists(spec) and os.path.exists(training) and os.path.samefile(spec, training)


def _run_data_dir(run: Any) -> Path | None:
    """The run's prepared data: the prepared directory it trained on, else the RUN/data it tokenized."""
    from ..data.shards import is_prepared

    training = run.train_config.data if run.train_config else None
    for candidate in (training, run.path / "data"):
        if candidate and is_prepared(candidate):
            return Path(candidate)
    return None


# ---------------------------------------------------------------------------------------------- loss
def _eval_loss(run: Any, data: LossData, depths: list[int], args: argparse.Namespace, out_dir: Path) -> None:
    from ..data.packing import val_batches
    from ..data.shards import ShardStore
    from ..eval.loss import format_table, loss_by_depth, plot_depth_curve

    cfg = run.config
    store = ShardStore.open(data.directory, data.split)
    seq_len = run.train_config.seq_len if run.train_config and run.train_config.seq_len else cfg.max_seq_len
    batches = list(val_batches(store, seq_len, args.batch_size, args.batches, pad_id=run.tokenizer.pad_id))
    if not batches:
        raise ValueError(f"the {data.split} split of {data.directory} is empty.")
    seeds, seed_words = _seeds_for_loss(cfg, args.seeds)
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
    name = _settings_name("loss", run, settings)
    payload = {"model": cfg.name, "weights": str(run.weights), "data": data.label,
               "data_path": str(data.directory / data.split), "split": data.split, "batches": len(batches),
               "batch_size": args.batch_size, "seq_len": seq_len, "tokens": first.tokens, "bytes": first.bytes,
               "seeds": seeds, "seed_note": seed_words, "settings": settings,
               "results": [r.to_dict() for r in results]}  # fmt: skip
    saved = [out_dir / f"{name}.json"]
    saved[0].write_text(json.dumps(payload, indent=2) + "\n")
    if len(results) > 1:
        plot_depth_curve(results, out_dir / f"{name}.png", f"{cfg.name}: test-time depth", cfg.mean_recurrence)
        saved.append(out_dir / f"{name}.png")
    print("saved " + " and ".join(map(str, saved)))


# ---------------------------------------------------------------------------------------------- CORE
def _eval_core(
    run: Any, tasks: list, core_dir: Path, depths: list[int], args: argparse.Namespace, out_dir: Path
) -> None:
    from ..eval.core import evaluate_core

    h0 = seed_changes_h0(run.config)
    seeds = list(range(args.seeds if args.seeds is not None else 3 if h0 else 1))
    settings = {"core": str(core_dir.resolve()), "tasks": [t.name for t in tasks], "max_per_task": args.max_per_task,
                "fewshot": args.fewshot, "depths": depths, "seeds": seeds}  # fmt: skip
    name = _settings_name("core", run, settings)
    predictions_path = out_dir / f"{name}.predictions.jsonl"
    partial = predictions_path.with_name(predictions_path.name + ".partial")  # an interrupted run keeps the old file
    with partial.open("w", encoding="utf-8") as predictions:
        result = evaluate_core(run.model, run.tokenizer, tasks, depths, seeds=seeds, max_per_task=args.max_per_task,
                               fewshot=args.fewshot, batch_size=args.batch_size, predictions=predictions,
                               progress=not args.no_progress)  # fmt: skip
    partial.replace(predictions_path)
    per_task = f"at most {args.max_per_task} examples per task" if args.max_per_task else "all examples"
    what = "few-shot draw and h₀" if h0 else "few-shot draw; this model's h₀ does not depend on it"
    print(f"\n{run.config.name} ({run.weights.name}): {result.label} from {core_dir}, {per_task}, "
          f"seeds {_seed_list(seeds)} ({what}); accuracy % (mean over seeds)")  # fmt: skip
    print(result.format_table())
    payload = {"model": run.config.name, "weights": str(run.weights), "settings": settings, **result.to_dict()}
    core_path = out_dir / f"{name}.json"
    core_path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {core_path} and {predictions_path}")


def _default_depths(mean: int) -> list[int]:
    depths, t = [], 1
    while t <= 2 * mean:
        depths.append(t)
        t *= 2
    return sorted({*depths, mean, 2 * mean})


# ---------------------------------------------------------------------------------------------- parcae core
def _register_core(commands: argparse._SubParsersAction) -> None:
    core = commands.add_parser(
        "core",
        help="download and cache the CORE task files (DCLM eval bundle)",
        description="The CORE task files for `parcae eval RUN --core`, from the public DCLM eval bundle.\n"
        "  parcae core download                           # fetch, verify, install into the cache\n"
        "  parcae core download --from eval_bundle.zip    # offline: install a local copy of the bundle\n"
        "  parcae core path                               # print the cache folder (verified)\n"
        "  parcae eval runs/tiny --core --max-per-task 20 # evaluate on the cached tasks (CORE-18)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).add_subparsers(dest="core_command", required=True, metavar="ACTION")
    fetch = core.add_parser(
        "download",
        help="download (or --from a local copy), verify and install the task files; a no-op when verified",
        description=f"Install the CORE task files of {BUNDLE_URL} into DIR.\n"
        "Verified: the zip's sha256 (pinned to the value several public projects record for that URL; we could\n"
        "not download it to confirm; --sha256 pins another), each task file's CRC-32 and presence, and that\n"
        "every line parses in its CORE format. Per-file sha256 go to DIR/manifest.json and are checked on every\n"
        "later use. DIR holds the 18 CORE-18 tasks flat (what `parcae eval --core` reads); HellaSwag, SQuAD and\n"
        "CoQA go to DIR/extra (`--core DIR/extra` runs them 0-shot with chance baselines).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fetch.add_argument("--from", dest="source_zip", metavar="ZIP", help="install from a local eval_bundle.zip")
    fetch.add_argument("--dir", metavar="DIR", help="install here (default $PARCAE_CACHE/core or ~/.cache/parcae/core)")
    fetch.add_argument("--sha256", metavar="HEX", help=f"expected sha256 of the zip (default {BUNDLE_SHA256[:12]}…)")
    fetch.add_argument("--url", default=BUNDLE_URL, help="download from this URL instead (a mirror)")
    fetch.add_argument("--force", action="store_true", help="reinstall even if DIR verifies")
    fetch.add_argument("--timeout", type=positive_float, default=60.0, help="network timeout in seconds (default 60)")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar")
    fetch.set_defaults(handler=cmd_download)
    path = core.add_parser("path", help="print the folder of the installed task files (after verifying them)")
    path.add_argument("--dir", metavar="DIR", help="check this folder instead of the cache")
    path.set_defaults(handler=cmd_path)


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
