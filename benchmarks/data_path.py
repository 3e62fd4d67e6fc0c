"""Held-out quality of this checkout's data path against another checkout's, with everything else equal.

Both sides train the same recipe for the same number of steps on `stdlib` through their own `parcae train` (so
their own sources, split, tokenization and packer), then both models are scored on one common text: 40 stdlib
files of 2–40 k characters chosen by a seeded shuffle, scored whole with `parcae eval --data DIR` (each side's
own validation split differs, so it is no common yardstick). Used for the 2026-12-04 entry of docs/LOG.md
(`--other` a checkout of 2db7dd4: before long documents were cut into pieces and the packer bounded by epochs).

Usage: python benchmarks/data_path.py --other CHECKOUT [--steps 300] [--out DIR]
Last line: held-out loss at T = 8, other and this checkout, and their difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"
RECIPE = ["--preset", "parcae-tiny", "--data", "stdlib", "--seq-len", "128", "--set", "optimizer=adamw", "--lr", "3e-3"]


def common_text(out: Path, files: int = 40, seed: int = 7) -> Path:
    """Write the common evaluation text: `files` stdlib modules of 2–40 k characters, a seeded choice."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    random.Random(seed).shuffle(candidates)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 2_000 < len(text) < 40_000:
            (out / f"{written:03d}.txt").write_text(text, encoding="utf-8")
            written += 1
        if written == files:
            break
    return out


def parcae(src: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-m", "parcae", *args], env=env, check=True, stdout=subprocess.DEVNULL)


def held_out_loss(run: Path) -> dict[str, float]:
    """Loss per depth of the newest evaluation JSON in RUN/eval (either side's file naming)."""
    newest = max((run / "eval").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return {str(r["depth"]): r["loss"] for r in json.loads(newest.read_text())["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, type=Path, help="a checkout of the commit to compare against")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="data-path-"))
    text = common_text(work / "common-text")
    losses = {}
    for name, src in (("other", args.other.resolve() / "src"), ("this", HERE)):
        run = work / name
        print(f"{name}: training {args.steps} steps ({src}) …", flush=True)
        parcae(src, "train", *RECIPE, "--steps", str(args.steps), "--out", str(run), "--no-progress")
        parcae(src, "eval", str(run), "--depths", "1,4,8", "--data", str(text), "--batches", "16", "--seeds", "1",
               "--no-progress")  # fmt: skip
        losses[name] = held_out_loss(run)
        print(f"{name}: held-out loss by depth {losses[name]}", flush=True)
    other, this = losses["other"]["8"], losses["this"]["8"]
    print(f"held-out loss at T = 8: other {other:.4f}, this {this:.4f}, difference {this - other:+.4f} nats/byte")


if __name__ == "__main__":
    main()
