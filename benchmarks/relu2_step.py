"""What the fused ReLU² (`HalfReluSquare`) contributes to a whole training step: parcae-tiny forward + backward with
our MLP vs the same weights with the official composite 0.5·relu(z)² (`train_speed.official_ops`), same batches and
depth plans, alternating.

Usage: python benchmarks/relu2_step.py [--steps 6] [--warmup 2] [--batch 16]
Last line: the ratio composite / fused of the median forward + backward time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from parcae import DepthSampler, Parcae, get_preset
from train_speed import official_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = get_preset("parcae-tiny", max_seq_len=128)
    fused = Parcae(cfg)
    composite = copy.deepcopy(fused)
    official_ops(composite)
    sampler = DepthSampler(cfg, seed=0)
    times: dict[str, list[float]] = {"fused": [], "composite": []}
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, 129), generator=torch.Generator().manual_seed(step))
        plan = sampler.sample(args.batch, 128, step)
        for name, model in (("fused", fused), ("composite", composite)):
            start = time.perf_counter()
            model(ids[:, :-1], labels=ids[:, 1:], depth_plan=plan, state_seed=step, return_logits=False).loss.backward()
            model.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    ours, theirs = statistics.median(times["fused"]), statistics.median(times["composite"])
    print(
        f"forward+backward ms, parcae-tiny {args.batch} × 128: fused {1000 * ours:.0f}, composite {1000 * theirs:.0f}"
    )
    print(f"composite / fused: {theirs / ours:.3f}")


if __name__ == "__main__":
    main()
