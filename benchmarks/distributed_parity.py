"""1 process vs 2 ranks (DDP and FSDP2 under torchrun, gloo on the CPU): the training losses, step by step.

The 2-rank runs are real `torchrun … -m parcae train` launches. The single process sees the same micro-batches
(rank 0's then rank 1's, grad_accum 2, through `InterleavedPacker`), so with fixed depths and a zero h₀ the three
runs take the same steps and must agree to rounding. Prints a table and, last, the largest difference.

    python benchmarks/distributed_parity.py                       # parcae-micro, 20 steps (≈ 2 min on 2 cores)
    python benchmarks/distributed_parity.py --preset parcae-tiny --steps 100 --seq-len 128 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from parcae import get_preset
from parcae.data.shards import prepare
from parcae.data.tokenizer import get_tokenizer
from parcae.train.config import TrainConfig
from parcae.train.distributed import InterleavedPacker
from parcae.train.trainer import Trainer

RANKS = 2


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if "loss" in e and "event" not in e}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="parcae-micro")
    parser.add_argument("--data", default="stdlib", help="data spec (tokenized once with the byte tokenizer)")
    parser.add_argument("--max-tokens", type=float, default=2e6, help="tokens to prepare from --data")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(args.data, get_tokenizer("byte"), root / "data", max_tokens=int(args.max_tokens), progress=False)
        settings = {"depth_sampling": "fixed", "state_init": "zero", "log_every": 1, "eval_batches": 0}
        train = ["--preset", args.preset, "--data", str(root / "data"), "--steps", str(args.steps), "--no-progress",
                 "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--device", "cpu"]  # fmt: skip
        for key, value in settings.items():
            train += ["--set", f"{key}={value}"]
        for parallel in ("ddp", "fsdp"):
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), "-m", "parcae"]
            command = [*launch, "train", *train, "--parallel", parallel, "--out", str(root / parallel)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

        model = get_preset(args.preset, depth_sampling="fixed", state_init="zero")
        config = TrainConfig(data=str(root / "data"), steps=args.steps, seq_len=args.seq_len, device="cpu",
                             batch_size=args.batch_size, grad_accum=RANKS, log_every=1, eval_batches=0)  # fmt: skip
        trainer = Trainer(model, config, root / "one", progress_bar=False, echo=lambda _: None)
        trainer.packer = InterleavedPacker([trainer.rank_packer(r, RANKS) for r in range(RANKS)])
        trainer.train()

        one, ddp, fsdp = losses(root / "one"), losses(root / "ddp"), losses(root / "fsdp")
    print(f"{'step':>4}  {'1 process':>12}  {'2-rank DDP':>12}  {'2-rank FSDP':>12}")
    for step in sorted(one):
        print(f"{step:>4}  {one[step]:12.6f}  {ddp[step]:12.6f}  {fsdp[step]:12.6f}")
    gap_ddp = max(abs(one[s] - ddp[s]) for s in one)
    gap_fsdp = max(abs(one[s] - fsdp[s]) for s in one)
    print(f"max |loss difference| over {len(one)} steps: 1 vs DDP {gap_ddp:.2e}, 1 vs FSDP {gap_fsdp:.2e}")


if __name__ == "__main__":
    main()
