"""Executed vs sampled core passes per micro-batch: ours (prefix compaction) vs the official masked loop.

The official per-sequence loop runs every row for the batch maximum of the no-grad and of the grad steps
(masking the rows that are done), so it executes B·(max n + max k) row-passes; ours executes Σ_rows T_row.
Usage: python benchmarks/core_passes.py [--batch 32] [--mean 8] [--batches 200]
Last line: the executed/sampled ratio of our loop, measured on real forwards.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from parcae import Parcae, get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mean", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()

    cfg = get_preset("parcae-micro", mean_recurrence=args.mean, max_seq_len=8)
    model = Parcae(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, 8))
    ours, official = [], []
    with torch.no_grad():
        for step in range(args.batches):
            metrics = model(ids, step=step).metrics
            plan = model.depth_sampler.sample(args.batch, 8, step)  # the same draw the forward used
            official_passes = args.batch * (int(plan.no_grad.max()) + int(plan.grad.max()))
            ours.append(metrics["executed_core_passes"] / metrics["sampled_core_passes"])
            official.append(official_passes / metrics["sampled_core_passes"])
    print(f"micro-batch {args.batch}, mu_rec {args.mean}, {args.batches} batches, per-sequence Poisson depths")
    print(f"official masked loop: executed/sampled median {statistics.median(official):.3f}, max {max(official):.3f}")
    print(f"parcae (compacted):   executed/sampled median {statistics.median(ours):.3f}, max {max(ours):.3f}")
    print(f"executed/sampled ours={max(ours):.3f} official={statistics.median(official):.3f}")


if __name__ == "__main__":
    main()
