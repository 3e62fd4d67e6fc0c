"""`parcae lab stability` (an injection × learning-rate grid: which runs diverge, and why) and `parcae lab reasoning`
(Parcae vs fixed-depth Transformers on synthetic multi-step tasks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import EPILOG_DATA, float_list, int_list, name_list, positive_float, positive_int

_DEFAULTS = "defaults: 3 injections × LR 3e-3,1e-2,3e-2 × 200 steps + 3 ablation runs at 1e-2 (≈ 40–50 min, 2 cores)"


def register_lab(lab: argparse._SubParsersAction) -> None:
    stability = lab.add_parser(
        "stability",
        help="injection × LR grid: converged/diverged, ρ(Ā), ‖h_T‖, Jacobian spectral radius, ablations",
        description="Train a grid of looped models that differ only in injection and learning rate (plus the\n"
        "Parcae ablations), classify each run converged/diverged and report ρ(Ā), ‖h_T‖ and the spectral radius\n"
        "of the loop map's Jacobian. Example:\n"
        "  parcae lab stability --preset parcae-tiny --data stdlib --out labs/stability\n"
        "  parcae lab stability --preset parcae-tiny --data stdlib --quick --out labs/quick\n" + _DEFAULTS,
        epilog=EPILOG_DATA,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stability.add_argument("--preset", default="parcae-tiny", help="model preset (default parcae-tiny)")
    stability.add_argument("--data", default="stdlib", help="data spec, tokenized once for all runs (default stdlib)")
    stability.add_argument("--out", required=True, metavar="DIR", help="lab directory (rerun to continue it)")
    stability.add_argument("--injections", type=name_list, help="comma-separated (default diagonal,add,linear)")
    stability.add_argument("--lrs", type=float_list, help="comma-separated learning rates (default 3e-3,1e-2,3e-2)")
    stability.add_argument("--recurrences", type=int_list, help="comma-separated μ_rec values (default: the preset's)")
    stability.add_argument("--seeds", type=positive_int, help="seeds per grid point (default 1)")
    stability.add_argument("--quick", action="store_true",
                           help="LR 3e-3,3e-2, 60 steps, no ablations, final Jacobian only (≈ 6–8 min)")  # fmt: skip
    stability.add_argument("--steps", type=positive_int, help="optimizer steps per run (default 200; --quick 60)")
    stability.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 20; --quick 10)")
    stability.add_argument("--batch-size", type=positive_int, help="sequences per step (default 16)")
    stability.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default 128)")
    stability.add_argument("--prelude-norm", choices=("paper", "on", "off"),
                           help="paper (default): on for diagonal injections, off for add/linear")  # fmt: skip
    stability.add_argument("--ablations", type=_ablations,
                           help="among depth-sampling,prelude-norm,zoh, or 'none' (default all three)")  # fmt: skip
    stability.add_argument("--ablation-lr", type=positive_float, help="learning rate of the ablations (default 1e-2)")
    stability.add_argument("--jacobian-every", type=int, help="steps between Jacobian probes; 0 = final model only")
    stability.add_argument("--max-state-rms", type=positive_float,
                           help="state-norm blow-up threshold on ‖h_T‖/√d_state (default 256)")  # fmt: skip
    stability.add_argument("--state-growth", type=positive_float,
                           help="state-growth threshold on ‖h_2μ‖/‖h_μ‖ at the end (default 2.5)")  # fmt: skip
    stability.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a model field for every run (e.g. d_model=64)")  # fmt: skip
    stability.add_argument("--device", help="auto (default: cuda when available, else cpu), cpu, cuda, cuda:N")
    stability.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    stability.set_defaults(handler=cmd_stability)
    _register_reasoning(lab)


def cmd_stability(args: argparse.Namespace) -> int:
    from ..lab.stability import QUICK, LabConfig, Thresholds, plan_runs, run_lab
    from ..train.config import parse_overrides

    fields: dict = dict(QUICK) if args.quick else {}
    options = {
        "preset": args.preset, "data": args.data, "injections": args.injections, "lrs": args.lrs,
        "recurrences": args.recurrences, "seeds": args.seeds, "steps": args.steps, "warmup_steps": args.warmup_steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "prelude_norm": args.prelude_norm,
        "ablations": args.ablations, "ablation_lr": args.ablation_lr, "jacobian_every": args.jacobian_every,
        "device": args.device,
    }  # fmt: skip
    fields.update({k: v for k, v in options.items() if v is not None})
    model_overrides, train_overrides = parse_overrides(args.set)
    if train_overrides:
        raise ValueError(f"--set takes model fields only; the lab sets {', '.join(sorted(train_overrides))} itself.")
    fields["model_overrides"] = model_overrides
    thresholds = {"max_state_rms": args.max_state_rms, "state_growth": args.state_growth}
    fields["thresholds"] = Thresholds(**{k: v for k, v in thresholds.items() if v is not None})
    lab = LabConfig(**fields)
    if args.dry_run:
        specs = plan_runs(lab)
        for spec in specs:
            print(f"{spec.name:<40} {', '.join(spec.groups)}")
        print(f"{len(specs)} runs × {lab.steps} steps = {len(specs) * lab.steps:,} optimizer steps on {lab.device}")
        return 0
    run_lab(lab, args.out)
    return 0


def _ablations(text: str) -> list[str]:
    return [] if text.strip() == "none" else name_list(text)


# ---------------------------------------------------------------------------------------------- reasoning
def _register_reasoning(lab: argparse._SubParsersAction) -> None:
    parser = lab.add_parser(
        "reasoning",
        help="Parcae vs fixed-depth Transformers on synthetic multi-step tasks",
        description="Train Parcae and fixed-depth Transformers (equal parameters, equal FLOPs) on the same\n"
        "synthetic examples; report exact match per difficulty and test-time depth.\n"
        "  parcae lab reasoning --task chain --train-difficulty 1-6 --test-difficulty 1-12 --minutes 25 --out runs/r",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", required=True, help="chain | addition | parity | pointer")
    parser.add_argument("--train-difficulty", required=True, help="difficulties trained on, e.g. 1-6 or 1,2,4")
    parser.add_argument("--test-difficulty", required=True, help="difficulties tested, e.g. 1-12 (beyond training)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--minutes", type=positive_float, help="training time for all three models together (default 10)"
    )
    budget.add_argument("--steps", type=positive_int, help="training steps per model (instead of --minutes)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="examples per step (default 64)")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW peak learning rate (default 3e-3)")
    parser.add_argument(
        "--test-per-difficulty", type=positive_int, default=200, help="test examples per difficulty (default 200)"
    )
    parser.add_argument("--preset", default="parcae-tiny", help="the looped model's shape (default parcae-tiny)")
    parser.add_argument("--exit", default="latent:0.01", help="adaptive-exit criterion (default latent:0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and depths (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (must not hold results)")
    parser.set_defaults(handler=_cmd_reasoning)


def _cmd_reasoning(args: argparse.Namespace) -> int:
    from ..lab.reasoning import run_reasoning_lab
    from ..lab.tasks import get_task, parse_difficulties
    from ..model.exit import ExitCriterion

    task = get_task(args.task)
    ExitCriterion.parse(args.exit)  # a bad spec fails before any training
    out = Path(args.out)
    if (out / "results.json").exists():
        raise ValueError(f"{out} already holds reasoning results; choose another --out.")
    run_reasoning_lab(
        task.name, parse_difficulties(args.train_difficulty, task), parse_difficulties(args.test_difficulty, task),
        out, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
        test_per_difficulty=args.test_per_difficulty, preset=args.preset, exit=args.exit, seed=args.seed,
    )  # fmt: skip
    return 0
