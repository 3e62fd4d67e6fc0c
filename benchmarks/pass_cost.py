"""What a core pass costs with and without gradient, eager and compiled — and the compaction bound that implies.

`train_speed.py` prints the bound on what skipping the official loop's masked passes can gain, weighting a no-grad
pass 1 and a gradient pass 3. Here the weights are measured on parcae-tiny's core blocks (same input, medians of
alternating repetitions), and the bound recomputed from 200 sampled depth plans of the official micro-batch.
torch.compile speeds up the no-grad passes (pure inference graphs) far more than the gradient passes — the very
passes the compacted loop skips — so the bound is lower compiled than eager.

Usage: python benchmarks/pass_cost.py [--batch 32] [--seq-len 128] [--reps 15]
Last line: the bound, eager and compiled.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from parcae import DepthSampler, Parcae, get_preset
from train_speed import pass_cost_ratio


def bound(sampler: DepthSampler, rows: int, seq_len: int, grad_weight: float, plans: int = 200) -> float:
    """Median over sampled plans of `pass_cost_ratio` (no-grad pass 1, gradient pass grad_weight)."""
    return statistics.median(pass_cost_ratio(sampler.sample(rows, seq_len, step), grad_weight) for step in range(plans))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = get_preset("parcae-tiny", max_seq_len=args.seq_len)
    eager = Parcae(cfg)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    cos, sin = eager.rotary.tables(args.seq_len)
    x = torch.randn(args.batch, args.seq_len, cfg.d_model)

    def no_grad_pass(model: Parcae) -> None:
        with torch.no_grad():
            y = x
            for block in model.core:
                y = block(y, cos, sin, None)

    def grad_pass(model: Parcae) -> None:
        y = x.clone().requires_grad_()
        for block in model.core:
            y = block(y, cos, sin, None)
        y.sum().backward()

    cases = {(mode, kind): [] for mode in ("eager", "compiled") for kind in ("no-grad", "grad")}
    for rep in range(args.reps + 3):  # 3 warm-up rounds (compilation happens there)
        for (mode, kind), times in cases.items():
            model = eager if mode == "eager" else compiled
            start = time.perf_counter()
            (no_grad_pass if kind == "no-grad" else grad_pass)(model)
            if rep >= 3:
                times.append(time.perf_counter() - start)
    sampler = DepthSampler(cfg, seed=0)
    bounds = {}
    for mode in ("eager", "compiled"):
        no_grad_ms = 1000 * statistics.median(cases[(mode, "no-grad")])
        grad_ms = 1000 * statistics.median(cases[(mode, "grad")])
        bounds[mode] = bound(sampler, args.batch, args.seq_len, grad_ms / no_grad_ms)
        print(f"{mode:<9} no-grad pass {no_grad_ms:7.1f} ms, gradient pass {grad_ms:7.1f} ms "
              f"(× {grad_ms / no_grad_ms:.2f})")  # fmt: skip
    print(f"at weights 1 : 3 the bound would be {bound(sampler, args.batch, args.seq_len, 3.0):.2f}")
    print(f"compaction bound at {args.batch} rows, measured pass costs: eager {bounds['eager']:.2f}, "
          f"compiled {bounds['compiled']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
