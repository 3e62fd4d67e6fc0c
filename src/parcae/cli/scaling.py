"""`parcae flops`, `parcae sweep plan|run|estimate` and `parcae fit isoflop|params|testtime|unified`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .args import EPILOG_DATA, float_list, int_list, positive_int

FIT_KINDS = ("isoflop", "params", "testtime", "unified")


def register(commands: argparse._SubParsersAction) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    flops = commands.add_parser(
        "flops",
        help="training FLOPs per token of a model (ours and the official formula)",
        description="Training FLOPs per token, C/D = 2·N̂₁ + 6·N̂₂ + attention, with the expected no-grad and grad\n"
        "iterations of the depth sampler; also the official cost.py figure. Example:\n"
        "  parcae flops --preset parcae-140m\n"
        "  parcae flops --preset parcae-tiny --seq-len 128 --set mean_recurrence=4",
        formatter_class=formatter,
    )
    flops.add_argument("--preset", required=True, help="model preset (see `parcae presets`)")
    flops.add_argument("--seq-len", type=positive_int, help="sequence length (default: the model's context)")
    flops.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model field")
    flops.add_argument("--causal", action="store_true", help="count only the causal half of attention scores")
    flops.add_argument("--json", action="store_true", help="print JSON instead of a table")
    flops.set_defaults(handler=cmd_flops)

    sweep = commands.add_parser("sweep", help="isoFLOP sweeps: plan, run (resumable), estimate wall time")
    actions = sweep.add_subparsers(dest="sweep_command", required=True, metavar="ACTION")
    plan = actions.add_parser(
        "plan",
        help="write a sweep plan: budgets × recurrences → tokens",
        description="Plan an isoFLOP sweep: one run per (budget, μ_rec) with μ_bwd = ⌈μ_rec/2⌉ and\n"
        "tokens = budget / FLOPs-per-token (rounded to whole steps). Example:\n"
        "  parcae sweep plan --preset parcae-micro --data stdlib --budgets 1e13,2e13,4e13 \\\n"
        "      --recurrences 1,2,4,8 --out sweeps/micro.json",
        epilog=EPILOG_DATA,
        formatter_class=formatter,
    )
    plan.add_argument("--preset", help="model preset")
    plan.add_argument("--config", metavar="FILE", help="YAML/JSON with optional preset, model and train sections")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model/train field")
    plan.add_argument("--budgets", type=float_list, required=True, help="FLOP budgets, comma-separated")
    plan.add_argument("--recurrences", type=int_list, required=True, help="mean recurrences μ_rec, comma-separated")
    plan.add_argument("--eval-depths", type=int_list, help="test-time depths (default 1,2,4,6,…,24 up to 2·max μ_rec)")
    plan.add_argument("--eval-batches", type=positive_int, default=16, help="validation batches (default 16)")
    plan.add_argument("--data", help="data spec (default: stdlib); tokenized once for the whole sweep")
    plan.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch (default 16)")
    plan.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default: the model's context)")
    plan.add_argument("--runs-dir", help="where runs and results.csv go (default: PLAN without .json)")
    plan.add_argument("--out", required=True, metavar="PLAN.json", help="the plan file to write")
    plan.set_defaults(handler=cmd_sweep_plan)

    run = actions.add_parser(
        "run",
        help="train every unfinished run of a plan, then evaluate into RUNS/results.csv",
        description="Train the runs of a plan one after another (finished runs are skipped, interrupted ones\n"
        "resumed), evaluate each at its eval depths and append to RUNS/results.csv. With --emit, print the\n"
        "torchrun commands instead of training.",
        formatter_class=formatter,
    )
    run.add_argument("plan", metavar="PLAN.json")
    run.add_argument("--emit", action="store_true", help="print torchrun commands instead of training")
    run.add_argument("--nproc-per-node", type=positive_int, default=1, help="with --emit: processes per node")
    run.add_argument("--progress", action="store_true", help="show a progress bar per run")
    run.set_defaults(handler=cmd_sweep_run)

    estimate = actions.add_parser("estimate", help="estimate a plan's wall time on this machine from timed steps")
    estimate.add_argument("plan", metavar="PLAN.json")
    estimate.add_argument("--probe-steps", type=positive_int, default=5, help="timed steps per μ_rec (default 5)")
    estimate.set_defaults(handler=cmd_sweep_estimate)

    fit = commands.add_parser(
        "fit",
        help="fit a scaling law to a sweep's results CSV (fit.json + PNG plots)",
        description="Fit one of the paper's laws to RESULTS.csv and write DIR/fit.json and PNG plots:\n"
        "  isoflop   per-budget parabolas in ln μ_rec → μ*(C), D*(C) power laws (bootstrap CIs)\n"
        "  params    L = E + A·N^−a + B·D^−b at T = μ_rec (Huber on log loss, L-BFGS, random restarts)\n"
        "  testtime  L(T) = L∞ + Z·e^(−zT) per run vs the Table 12 alternatives (in-dist / extrapolating)\n"
        "  unified   L = E + X·N^−x + Y·D^−y + Z·e^(−z·T/μ_rec) on every row\n"
        "Example: parcae fit isoflop sweeps/micro/results.csv --out fits/isoflop",
        formatter_class=formatter,
    )
    fit.add_argument("kind", choices=FIT_KINDS)
    fit.add_argument("results", metavar="RESULTS.csv")
    fit.add_argument("--holdout", metavar="CSV", help="params/unified: report the error on these rows")
    fit.add_argument("--out", required=True, metavar="DIR", help="output directory")
    fit.add_argument("--restarts", type=positive_int, default=200, help="params/unified: random starts (200)")
    fit.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates (isoflop 1000, others 200)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--overwrite", action="store_true", help="replace an existing DIR/fit.json")
    fit.set_defaults(handler=cmd_fit)


# ---------------------------------------------------------------------- handlers
def cmd_flops(args: argparse.Namespace) -> int:
    from ..model.config import get_preset
    from ..scaling.flops import flops_per_token, format_breakdown, official_flops_per_token
    from ..train.config import parse_overrides

    model_set, train_set = parse_overrides(args.set)
    if train_set:
        raise ValueError(f"--set takes model fields here; {', '.join(train_set)} are training fields.")
    cfg = get_preset(args.preset, **model_set)
    seq_len = args.seq_len or cfg.max_seq_len
    count = flops_per_token(cfg, seq_len, causal=args.causal)
    if args.json:
        print(json.dumps({**count.to_dict(), "official": official_flops_per_token(cfg, seq_len)}, indent=2))
    else:
        print(format_breakdown(cfg, count))
    return 0


def cmd_sweep_plan(args: argparse.Namespace) -> int:
    from ..scaling.sweep import format_plan, make_plan
    from ..train.config import build_configs

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose another --out (a plan is never overwritten).")
    if out.suffix != ".json":
        raise ValueError(f"--out must name a .json file, got {out}.")
    options = {"data": args.data, "batch_size": args.batch_size, "seq_len": args.seq_len}
    model_cfg, train_cfg = build_configs(
        args.preset, args.config, args.set, {k: v for k, v in options.items() if v is not None}
    )
    plan = make_plan(
        model_cfg, train_cfg, args.budgets, args.recurrences, eval_depths=args.eval_depths,
        eval_batches=args.eval_batches, runs_dir=args.runs_dir or out.stem,
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    print(format_plan(plan))
    total = plan.to_dict()["total_flops"]
    print(f"{len(plan.runs)} runs, {total:.3g} training FLOPs in all; plan written to {out}")
    print(f"next: parcae sweep estimate {out}   # wall time on this machine\n      parcae sweep run {out}")
    return 0


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from ..scaling.sweep import run_sweep

    results = run_sweep(args.plan, emit=args.emit, nproc=args.nproc_per_node, progress_bar=args.progress)
    if not args.emit and results.is_file():
        print(f"results: {results}")
    return 0


def cmd_sweep_estimate(args: argparse.Namespace) -> int:
    from ..scaling.sweep import SweepPlan, estimate_seconds

    plan = SweepPlan.load(args.plan)
    seconds = estimate_seconds(plan, args.probe_steps)
    print(f"estimated wall time of {len(plan.runs)} runs (training + evaluation): {seconds / 60:.1f} minutes")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from ..scaling import laws
    from ..scaling.plots import plot_fit

    out = Path(args.out)
    target = out / "fit.json"
    if target.exists() and not args.overwrite:
        raise ValueError(f"{target} already exists; choose another --out or pass --overwrite.")
    if args.holdout and args.kind not in ("params", "unified"):
        raise ValueError(f"--holdout applies to the params and unified fits, not {args.kind}.")
    if args.bootstrap is not None and args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be ≥ 0, got {args.bootstrap}.")
    results = laws.read_results(args.results)
    holdout = laws.read_results(args.holdout) if args.holdout else None
    bootstrap = args.bootstrap if args.bootstrap is not None else (1000 if args.kind == "isoflop" else 200)
    if args.kind == "isoflop":
        report = laws.fit_isoflop(results, bootstrap=bootstrap, seed=args.seed)
    elif args.kind == "testtime":
        report = laws.fit_testtime(results)
    else:
        fit = laws.fit_params if args.kind == "params" else laws.fit_unified
        report = fit(results, holdout=holdout, restarts=args.restarts, bootstrap=bootstrap, seed=args.seed)
    report["results"] = str(args.results)
    out.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    plots = plot_fit(report, out)
    print(laws.format_fit(report))
    print(f"wrote {target} and {', '.join(p.name for p in plots)}")
    return 0


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")
