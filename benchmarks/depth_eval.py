"""Evaluation at several test-time depths: one run of the loop for all of them (`Parcae.iterate_depths`, what
`loss_by_depth` does) vs one forward per depth (what it still does for an FSDP2-sharded model), side by side.

Usage: python benchmarks/depth_eval.py [--depths 1,2,4,8,16] [--repeats 3]
Last line: the ratio per-depth / one-pass of the median wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import parcae.eval.loss as loss_module
from parcae import Parcae, get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    torch.manual_seed(0)
    model = Parcae(get_preset("parcae-tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (16, 128))
    batches = [(ids, ids)] * 2
    real = loss_module._is_fsdp
    modes = {"one pass": lambda model: False, "per depth": lambda model: True}
    times: dict[str, list[float]] = {name: [] for name in modes}
    try:
        for _ in range(args.repeats):
            for name, is_fsdp in modes.items():  # alternating, so load changes hit both alike
                loss_module._is_fsdp = is_fsdp
                start = time.perf_counter()
                loss_module.loss_by_depth(model, batches, depths)
                times[name].append(time.perf_counter() - start)
    finally:
        loss_module._is_fsdp = real
    one, per = statistics.median(times["one pass"]), statistics.median(times["per depth"])
    print(f"parcae-tiny, 2 batches of 16 × 128, depths {args.depths}: one pass {one:.2f} s, per depth {per:.2f} s")
    print(f"per depth / one pass: {per / one:.2f}")


if __name__ == "__main__":
    main()
