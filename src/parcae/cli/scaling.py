"""`parcae flops`, `parcae sweep plan|run|estimate` and `parcae fit isoflop|params|testtime|unified`."""

import argparse
import json
from pathlib import Path

from .args import EPILOG_DATA, Commands, actions, command, float_list, given, int_list, non_negative_int, positive_int

FLOPS_DESCRIPTION = """\
Training FLOPs per token, C/D = 2·N̂₁ + 6·N̂₂ + attention (expected sampler iterations) and the official cost.py figure:
  parcae flops --preset parcae-140m
  parcae flops --preset parcae-tiny --seq-len 128 --set mean_recurrence=4"""

PLAN_DESCRIPTION = """\
Plan an isoFLOP sweep: one run per (budget, μ_rec), μ_bwd = ⌈μ_rec/2⌉, tokens = budget / FLOPs-per-token in whole steps:
  parcae sweep plan --preset parcae-micro --budgets 1e13,2e13,4e13 --recurrences 1,2,4,8 --out sweeps/micro.json"""

RUN_DESCRIPTION = """\
Train a plan's runs in turn (finished ones skipped, interrupted ones resumed), evaluate each at its eval
depths into RUNS/results.csv. With --emit, print the torchrun commands instead of training."""

FIT_DESCRIPTION = """\
Fit one of the paper's laws to RESULTS.csv and write DIR/fit.json and PNG plots:
  isoflop   per-budget parabolas in ln μ_rec → μ*(C), D*(C) power laws (bootstrap CIs)
  params    L = E + A·N^−a + B·D^−b at T = μ_rec (Huber on log loss, L-BFGS, random restarts)
  testtime  L(T) = L∞ + Z·e^(−zT) per run vs the Table 12 alternatives (in-dist / extrapolating)
  unified   L = E + X·N^−x + Y·D^−y + Z·e^(−z·T/μ_rec) on every row
Example: parcae fit isoflop sweeps/micro/results.csv --out fits/isoflop"""


def register(commands: Commands) -> None:
    about = "training FLOPs per token of a model (ours and the official formula)"
    flops = command(commands, "flops", about, FLOPS_DESCRIPTION, handler=cmd_flops)
    add = flops.add_argument
    add("--preset", required=True, help="model preset (see `parcae presets`)")
    add("--seq-len", type=positive_int, help="sequence length (default: the model's context)")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model field")
    add("--causal", action="store_true", help="count only the causal half of attention scores")
    add("--json", action="store_true", help="print JSON instead of a table")

    about = "isoFLOP sweeps: plan, run (resumable), estimate wall time"
    sweep = actions(commands.add_parser("sweep", help=about), "sweep_command")
    about = "write a sweep plan: budgets × recurrences → tokens"
    plan = command(sweep, "plan", about, PLAN_DESCRIPTION, epilog=EPILOG_DATA, handler=cmd_sweep_plan)
    add = plan.add_argument
    add("--preset", help="model preset")
    add("--config", metavar="FILE", help="YAML/JSON with optional preset, model and train sections")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model/train field")
    add("--budgets", type=float_list, required=True, help="FLOP budgets, comma-separated")
    add("--recurrences", type=int_list, required=True, help="mean recurrences μ_rec, comma-separated")
    add("--eval-depths", type=int_list, help="test-time depths (default 1,2,4,6,…,24 up to 2·max μ_rec)")
    add("--eval-batches", type=positive_int, default=16, help="validation batches (default 16)")
    add("--data", help="data spec (default: stdlib); tokenized once for the whole sweep")
    add("--batch-size", type=positive_int, help="sequences per micro-batch (default 16)")
    add("--seq-len", type=positive_int, help="tokens per sequence (default: the model's context)")
    add("--runs-dir", help="where runs and results.csv go (default: PLAN without .json)")
    add("--out", required=True, metavar="PLAN.json", help="the plan file to write")

    about = "train every unfinished run of a plan, then evaluate into RUNS/results.csv"
    run = command(sweep, "run", about, RUN_DESCRIPTION, handler=cmd_sweep_run)
    run.add_argument("plan", metavar="PLAN.json")
    run.add_argument("--emit", action="store_true", help="print torchrun commands instead of training")
    run.add_argument("--nproc-per-node", type=positive_int, default=1, help="with --emit: processes per node")
    run.add_argument("--progress", action="store_true", help="show a progress bar per run")

    about = "estimate a plan's wall time on this machine from timed steps"
    estimate = command(sweep, "estimate", about, handler=cmd_sweep_estimate)
    estimate.add_argument("plan", metavar="PLAN.json")
    estimate.add_argument("--probe-steps", type=positive_int, default=5, help="timed steps per μ_rec (default 5)")

    about = "fit a scaling law to a sweep's results CSV (fit.json + PNG plots)"
    fit = command(commands, "fit", about, FIT_DESCRIPTION, handler=cmd_fit)
    add = fit.add_argument
    add("kind", choices=("isoflop", "params", "testtime", "unified"))
    add("results", metavar="RESULTS.csv")
    add("--holdout", metavar="CSV", help="params/unified: report the error on these rows")
    add("--out", required=True, metavar="DIR", help="output directory")
    add("--restarts", type=positive_int, default=200, help="params/unified: random starts (200)")
    add("--bootstrap", type=non_negative_int, help="bootstrap replicates (isoflop 1000, others 200)")
    add("--seed", type=int, default=0)
    add("--overwrite", action="store_true", help="replace an existing DIR/fit.json")


def cmd_flops(args: argparse.Namespace) -> int:
    from ..model.config import get_preset
    from ..scaling.flops import flops_per_token, format_breakdown, official_flops_per_token
    from ..train.config import parse_overrides

    model_set, train_set = parse_overrides(args.set)
    if train_set:
        raise ValueError(f"--set takes model fields here; {', '.join(train_set)} are training fields.")
    cfg = get_preset(args.preset, **model_set)
    count = flops_per_token(cfg, args.seq_len, causal=args.causal)
    if args.json:
        print(json.dumps({**count.to_dict(), "official": official_flops_per_token(cfg, count.seq_len)}, indent=2))
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
    options = given(args, "data", "batch_size", "seq_len")
    model_cfg, train_cfg = build_configs(args.preset, args.config, args.set, options)
    plan = make_plan(model_cfg, train_cfg, args.budgets, args.recurrences, eval_depths=args.eval_depths,
                     eval_batches=args.eval_batches, runs_dir=args.runs_dir or out.stem)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    print(format_plan(plan))
    print(f"{len(plan.runs)} runs, {plan.to_dict()['total_flops']:.3g} training FLOPs in all; plan written to {out}")
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
    minutes = estimate_seconds(plan, args.probe_steps) / 60
    print(f"estimated wall time of {len(plan.runs)} runs (training + evaluation): {minutes:.1f} minutes")
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
    # A fit report holds NumPy scalars and arrays: JSON numbers and lists.
    target.write_text(json.dumps(report, indent=2, default=lambda value: value.tolist()) + "\n")
    plots = plot_fit(report, out)
    print(laws.format_fit(report))
    print(f"wrote {target} and {', '.join(p.name for p in plots)}")
    return 0
