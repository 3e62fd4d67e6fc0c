"""`parcae lab stability` (an injection × learning-rate grid: which runs diverge, and why) and `parcae lab reasoning`
(Parcae vs fixed-depth Transformers on synthetic multi-step tasks)."""

import argparse
from pathlib import Path

from .args import EPILOG_DATA, actions, command, float_list, given, int_list, name_list, positive_float, positive_int

STABILITY_DESCRIPTION = """\
Train a grid of looped models that differ only in injection and learning rate (plus the
Parcae ablations), classify each run converged/diverged and report ρ(Ā), ‖h_T‖ and the spectral radius
of the loop map's Jacobian. Example:
  parcae lab stability --preset parcae-tiny --data stdlib --out labs/stability
  parcae lab stability --preset parcae-tiny --data stdlib --quick --out labs/quick
defaults: 3 injections × LR 3e-3,1e-2,3e-2 × 200 steps + 3 ablation runs at 1e-2 (≈ 40–50 min, 2 cores)"""

REASONING_DESCRIPTION = """\
Train Parcae and fixed-depth Transformers (equal parameters, equal FLOPs) on the same
synthetic examples; report exact match per difficulty and test-time depth.
  parcae lab reasoning --task chain --train-difficulty 1-6 --test-difficulty 1-12 --minutes 25 --out runs/r"""

# The options that are LabConfig fields of the same name (the others keep LabConfig's defaults).
LAB_FIELDS = ("preset", "data", "injections", "lrs", "recurrences", "seeds", "steps", "warmup_steps", "batch_size",
              "seq_len", "prelude_norm", "ablations", "ablation_lr", "jacobian_every", "device")  # fmt: skip


def register(commands: argparse._SubParsersAction) -> None:
    lab = actions(commands.add_parser("lab", help="experiments: stability, reasoning, …"), "lab_command", "EXPERIMENT")
    about = "injection × LR grid: converged/diverged, ρ(Ā), ‖h_T‖, Jacobian spectral radius, ablations"
    stability = command(lab, "stability", about, STABILITY_DESCRIPTION, epilog=EPILOG_DATA, handler=cmd_stability)
    add = stability.add_argument
    add("--preset", default="parcae-tiny", help="model preset (default parcae-tiny)")
    add("--data", default="stdlib", help="data spec, tokenized once for all runs (default stdlib)")
    add("--out", required=True, metavar="DIR", help="lab directory (rerun to continue it)")
    add("--injections", type=name_list, help="comma-separated (default diagonal,add,linear)")
    add("--lrs", type=float_list, help="comma-separated learning rates (default 3e-3,1e-2,3e-2)")
    add("--recurrences", type=int_list, help="comma-separated μ_rec values (default: the preset's)")
    add("--seeds", type=positive_int, help="seeds per grid point (default 1)")
    add("--quick", action="store_true", help="LR 3e-3,3e-2, 60 steps, no ablations, final Jacobian only (≈ 6–8 min)")
    add("--steps", type=positive_int, help="optimizer steps per run (default 200; --quick 60)")
    add("--warmup-steps", type=int, help="linear warm-up steps (default 20; --quick 10)")
    add("--batch-size", type=positive_int, help="sequences per step (default 16)")
    add("--seq-len", type=positive_int, help="tokens per sequence (default 128)")
    add("--prelude-norm", choices=("paper", "on", "off"),
        help="paper (default): on for diagonal injections, off for add/linear")  # fmt: skip
    add("--ablations", type=_ablations, help="among depth-sampling,prelude-norm,zoh, or 'none' (default all three)")
    add("--ablation-lr", type=positive_float, help="learning rate of the ablations (default 1e-2)")
    add("--jacobian-every", type=int, help="steps between Jacobian probes; 0 = final model only")
    add("--max-state-rms", type=positive_float, help="state-norm blow-up threshold on ‖h_T‖/√d_state (default 256)")
    add("--state-growth", type=positive_float, help="state-growth threshold on ‖h_2μ‖/‖h_μ‖ at the end (default 2.5)")
    add("--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a model field for every run (e.g. d_model=64)")  # fmt: skip
    add("--device", help="auto (default: cuda when available, else cpu), cpu, cuda, cuda:N")
    add("--dry-run", action="store_true", help="print the planned runs and exit")

    about = "Parcae vs fixed-depth Transformers on synthetic multi-step tasks"
    reasoning = command(lab, "reasoning", about, REASONING_DESCRIPTION, handler=cmd_reasoning)
    add = reasoning.add_argument
    add("--task", required=True, help="chain | addition | parity | pointer")
    add("--train-difficulty", required=True, help="difficulties trained on, e.g. 1-6 or 1,2,4")
    add("--test-difficulty", required=True, help="difficulties tested, e.g. 1-12 (beyond training)")
    budget = reasoning.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=positive_float, help="training time for all three models (default 10)")
    budget.add_argument("--steps", type=positive_int, help="training steps per model (instead of --minutes)")
    add("--batch-size", type=positive_int, default=64, help="examples per step (default 64)")
    add("--lr", type=positive_float, default=3e-3, help="AdamW peak learning rate (default 3e-3)")
    add("--test-per-difficulty", type=positive_int, default=200, help="test examples per difficulty (default 200)")
    add("--preset", default="parcae-tiny", help="the looped model's shape (default parcae-tiny)")
    add("--exit", default="latent:0.01", help="adaptive-exit criterion (default latent:0.01)")
    add("--seed", type=int, default=0, help="seed of data, initialisation and depths (default 0)")
    add("--out", required=True, metavar="DIR", help="output directory (must not hold results)")


def cmd_stability(args: argparse.Namespace) -> int:
    from ..lab.stability import QUICK, LabConfig, Thresholds, plan_runs, run_lab
    from ..train.config import parse_overrides

    model_overrides, train_overrides = parse_overrides(args.set)
    if train_overrides:
        raise ValueError(f"--set takes model fields only; the lab sets {', '.join(sorted(train_overrides))} itself.")
    thresholds = Thresholds(**given(args, "max_state_rms", "state_growth"))
    fields = {**(QUICK if args.quick else {}), **given(args, *LAB_FIELDS)}
    lab = LabConfig(**fields, model_overrides=model_overrides, thresholds=thresholds)
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


def cmd_reasoning(args: argparse.Namespace) -> int:
    from ..lab.reasoning import run_reasoning_lab
    from ..lab.tasks import get_task, parse_difficulties
    from ..model.exit import ExitCriterion

    task = get_task(args.task)
    ExitCriterion.parse(args.exit)  # a bad spec fails before any training
    out = Path(args.out)
    if (out / "results.json").exists():
        raise ValueError(f"{out} already holds reasoning results; choose another --out.")
    train, test = parse_difficulties(args.train_difficulty, task), parse_difficulties(args.test_difficulty, task)
    run_reasoning_lab(task.name, train, test, out, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
                      lr=args.lr, test_per_difficulty=args.test_per_difficulty, preset=args.preset, exit=args.exit,
                      seed=args.seed)  # fmt: skip
    return 0
