"""Examples/s of the batched CORE harness vs one request at a time (the official lm_eval path's shape).

All sides score the same rows (every option of a few examples of each shared CORE task, rendered with its
few-shot prompt, truncated to the model's context) with the same model at the same depth: the CORE harness
(`parcae.eval.scoring.score_groups`: options sharing a prompt run it once through the KV cache, the rest in
length-sorted batches), the same harness with prompt sharing off (whole examples per batch, one pass each),
and one forward per option (`score_rows` on a single row). They are timed alternately, `--repeats` times
each; the figure is the ratio of the median rates of the harness and of one request at a time.
Usage: python benchmarks/eval_speed.py [--preset parcae-tiny] [--max-seq-len L] [--per-task 3] [--depth 8]
    [--batch-size 32] [--threads N]
Last line: the speed-up of the harness over one request at a time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from parcae import Parcae, get_preset
from parcae.data.tokenizer import ByteTokenizer
from parcae.eval.core import encode_examples, find_tasks, load_task, subset
from parcae.eval.scoring import evaluating, score_groups, score_rows

SHARED_CORE = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "core"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", type=Path, default=SHARED_CORE, help="directory of CORE task files, e.g. the one "
                        "`parcae core path` prints (default: shared/eval/core beside the repository)")  # fmt: skip
    parser.add_argument("--preset", default="parcae-tiny")
    parser.add_argument("--per-task", type=int, default=3, help="examples per task")
    parser.add_argument("--max-seq-len", type=int, help="the model's context (default: the preset's); longer "
                        "windows keep more of the few-shot prompts, which the options share")  # fmt: skip
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch of the harness")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.core.is_dir():
        raise SystemExit(f"no task directory at {args.core}; pass --core DIR")

    torch.manual_seed(0)
    overrides = {"max_seq_len": args.max_seq_len} if args.max_seq_len else {}
    model = Parcae(get_preset(args.preset, **overrides)).eval()  # speed does not depend on the weights
    tok = ByteTokenizer()
    groups = []
    for spec in find_tasks(args.core):
        task = load_task(spec, args.core)
        chosen = subset(len(task.examples), args.per_task)
        groups += [e.rows for e in encode_examples(task, chosen, tok, seed=0, shots=task.shots,
                                                   max_len=model.config.max_seq_len)]  # fmt: skip
    rows = [row for group in groups for row in group]
    common = {"num_steps": args.depth, "state_seed": 0, "pad_id": tok.pad_id, "vocab_limit": tok.vocab_size}
    tokens = sum(len(r.tokens) - 1 for r in rows)
    print(f"{args.preset} (context {model.config.max_seq_len}), T = {args.depth}, {torch.get_num_threads()} threads: "
          f"{len(groups)} examples, {len(rows)} rows, {tokens:,} tokens")  # fmt: skip

    def one_at_a_time() -> None:
        with evaluating(model):
            for row in rows:
                score_rows(model, [row], **common)

    sides = {
        "harness": lambda: score_groups(model, groups, batch_size=args.batch_size, **common),
        "unshared": lambda: score_groups(model, groups, batch_size=args.batch_size, share=False, **common),
        "single": one_at_a_time,
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            rates[name].append(len(groups) / (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"{name:>8}: median {medians[name]:7.2f} examples/s  (runs: "
              + ", ".join(f"{v:.2f}" for v in values) + ")")  # fmt: skip
    print(f"prompt sharing vs the same harness without it: {medians['harness'] / medians['unshared']:.2f}x")
    print(f"CORE harness vs one request at a time: {medians['harness'] / medians['single']:.2f}x examples/s")


if __name__ == "__main__":
    main()
