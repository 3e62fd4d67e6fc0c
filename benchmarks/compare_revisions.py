"""Bit-identity of two revisions of this repository: the same fixed-seed probe, run on each side's own code.

Why: a restructure (modules moving, e.g. `parcae.config` → `parcae.model.config`, CLI modules into
`parcae/cli/`) must not change a single output. This script proves it, or shows where it fails: it runs one
probe against each revision's `src/` and compares the SHA-256 of every tensor's raw bytes (dtype and shape
included) and the exact float values of losses and metrics.

What the probe covers, through the stable public API only (`import parcae`: `get_preset`, `Parcae`,
`DepthPlan`, the model's `forward` / `logits_by_depth` / `new_cache` / `forward_cached` / `generate`, and
`python -m parcae train|eval`), for every model family (parcae-tiny, rdm-add-tiny, rdm-linear-tiny, gpt-tiny):
  • the preset's config and the initial weights after `torch.manual_seed(0)`;
  • a training forward (loss, logits, loop metrics) with a depth plan drawn per row, its backward (the grad of
    every named parameter) and an AdamW step (the updated weights); then the same with the depths sampled by
    the model at `step=3`, and a forward with `DepthPlan.fixed`;
  • eval logits at depths 1, 2, 4, 8 from `logits_by_depth` and from plain `forward(num_steps=t)`;
  • a KV-cached prefill and decode step, and 16 tokens from `generate` greedy and seeded;
plus one CLI path: `parcae train` 4 steps of parcae-tiny on a small generated corpus, then `parcae eval`
(per-step metrics without timing fields, validation losses, the checkpoint's weights and optimizer state, the
eval results).

How: a revision is exported with `git archive REV src | tar -x` into a temp directory (git state untouched); a
directory is used as it is (default --new: this working tree). Each probe runs in a subprocess of this Python
with PYTHONPATH=<tree>/src, one torch thread and PYTHONHASHSEED=0, checks that `parcae.__file__` lies in that
tree, and writes its items (JSON) and tensors (.safetensors) so this process can diff them. Both probes run
concurrently; each is single-threaded, so the results do not depend on that.

Usage: python benchmarks/compare_revisions.py --old REV [--new REV|DIR] [--keep]
Output: one line per item, `same` or `DIFFERENT` (with the max |Δ| of differing tensors); last line
`bit-identical: N/M items`. Exit status 0 when all are identical, 1 when any differ, 2 when a probe fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("parcae-tiny", "rdm-add-tiny", "rdm-linear-tiny", "gpt-tiny")
DEPTHS = (1, 2, 4, 8)
BATCH, SEQ_LEN = 4, 64
ITEMS_FILE, TENSORS_FILE = "items.json", "tensors.safetensors"
# metrics.jsonl fields that measure time, not the computation: they differ between any two runs.
TIMING_KEY = re.compile(r"(per_s|seconds|_ms|time)$")


# ---------------------------------------------------------------------------------------------- probe side
class Recorder:
    """Items of one probe: per item, hashed tensors (kept for the parent's diff) and exact Python values."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, Any] = {}

    def add(self, name: str, tensors: dict[str, Any] | None = None, values: Any = None) -> None:
        import torch

        entry: dict[str, Any] = {"tensors": {}, "values": values}
        for sub, tensor in (tensors or {}).items():
            t = tensor.detach().cpu().contiguous().clone()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            head = f"{t.dtype}|{tuple(t.shape)}|".encode()
            entry["tensors"][sub] = {"sha256": hashlib.sha256(head + raw).hexdigest(), "shape": list(t.shape)}
            self.tensors[f"{name}|{sub}"] = t
        self.items[name] = entry

    def save(self, out: Path) -> None:
        from safetensors.torch import save_file

        (out / ITEMS_FILE).write_text(json.dumps(self.items, indent=1))
        save_file(self.tensors, str(out / TENSORS_FILE))


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Loop metrics as exact Python numbers (0-d tensors → float)."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in sorted(metrics.items())}


def _probe_family(rec: Recorder, name: str) -> None:
    import torch

    import parcae

    cfg = parcae.get_preset(name)
    rec.add(f"{name}/config", values=dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else vars(cfg))
    torch.manual_seed(0)
    model = parcae.Parcae(cfg)
    looped = cfg.n_core > 0
    rec.add(f"{name}/init.weights", dict(model.named_parameters()))

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ_LEN + 1), generator=g)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    depths = torch.randint(1, 2 * cfg.mean_recurrence + 1, (BATCH,), generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    def train_step(tag: str, **kwargs: Any) -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        out = model(inputs, labels, state_seed=7, **kwargs)
        out.loss.backward()
        rec.add(f"{name}/{tag}.loss", {"loss": out.loss}, out.loss.item())
        rec.add(f"{name}/{tag}.logits", {"logits": out.logits})
        rec.add(f"{name}/{tag}.metrics", values=_plain(out.metrics))
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        rec.add(f"{name}/{tag}.grads", grads, sorted(k for k, p in model.named_parameters() if p.grad is None))
        optimizer.step()
        rec.add(f"{name}/{tag}.adamw.weights", dict(model.named_parameters()))

    plan = {"depth_plan": parcae.DepthPlan.from_depths(depths, cfg.backprop_depth)} if looped else {}
    train_step("train.plan", **plan)
    train_step("train.step3", step=3)
    with torch.no_grad():
        fixed = {"depth_plan": parcae.DepthPlan.fixed(BATCH, 6, 2)} if looped else {}
        out = model(inputs, labels, state_seed=7, **fixed)
        rec.add(f"{name}/train.fixed-plan.loss", {"loss": out.loss, "logits": out.logits}, out.loss.item())

    model.eval()
    for t, logits in sorted(model.logits_by_depth(inputs, list(DEPTHS)).items()):
        rec.add(f"{name}/eval.logits_by_depth.t{t}", {"logits": logits})
    with torch.no_grad():
        for t in DEPTHS:
            out = model(inputs, labels, num_steps=t)
            rec.add(f"{name}/eval.forward.t{t}", {"loss": out.loss, "logits": out.logits}, out.loss.item())

    prompt = inputs[:2, :16].contiguous()
    cache = model.new_cache(2, 32, max_steps=4)
    first = model.forward_cached(prompt, cache, num_steps=4)
    rec.add(f"{name}/cached.prefill", {"logits": first.logits, "iterations": first.iterations})
    step = model.forward_cached(first.logits[:, -1:].argmax(-1), cache, num_steps=4)
    rec.add(f"{name}/cached.decode", {"logits": step.logits, "iterations": step.iterations})
    greedy = model.generate(prompt, 16, num_steps=4, temperature=0.0)
    rec.add(f"{name}/generate.greedy", {"tokens": greedy.tokens}, greedy.new_tokens)
    seeded = model.generate(prompt, 16, num_steps=4, temperature=1.0, top_k=40, seed=0)
    rec.add(f"{name}/generate.seeded", {"tokens": seeded.tokens}, seeded.new_tokens)


def _parcae_cli(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "parcae", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`parcae {' '.join(args)}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def _probe_cli(rec: Recorder, out: Path, data: Path) -> None:
    from safetensors.torch import load_file

    run = out / "run"
    _parcae_cli(
        "train", "--preset", "parcae-tiny", "--data", str(data), "--steps", "4", "--seq-len", str(SEQ_LEN),
        "--batch-size", str(BATCH), "--out", str(run), "--seed", "0", "--device", "cpu", "--no-progress",
        "--set", "log_every=1", "--set", "eval_every=2", "--set", "eval_batches=2",
    )  # fmt: skip
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    events = [{k: v for k, v in e.items() if not TIMING_KEY.search(k)} for e in events]
    rec.add("cli/train.losses", values=[e["loss"] for e in events if "loss" in e])
    rec.add("cli/train.metrics", values=[e for e in events if "event" not in e])
    rec.add("cli/train.events", values=[e for e in events if "event" in e])
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    rec.add("cli/train.checkpoint.weights", load_file(str(checkpoint / "model.safetensors")), checkpoint.name)
    rec.add("cli/train.checkpoint.optimizer", load_file(str(checkpoint / "optimizer.safetensors")))

    _parcae_cli(
        "eval", str(run), "--depths", "1,2,4", "--seeds", "2", "--batches", "2", "--batch-size", str(BATCH),
        "--threads", "1", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    (result,) = (run / "eval").glob("loss-*.json")
    rec.add("cli/eval.results", values=json.loads(result.read_text())["results"])


def probe(tree: Path, out: Path, data: Path) -> None:
    """The child: import this tree's parcae, record every item, save them under `out`."""
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p != here]  # benchmarks/ must not shadow anything parcae imports
    import torch

    torch.set_num_threads(1)
    import parcae

    where = Path(parcae.__file__).resolve()
    if not where.is_relative_to((tree / "src" / "parcae").resolve()):
        raise RuntimeError(f"imported parcae from {where}, expected it under {tree}/src")
    rec = Recorder()
    rec.add("api/preset_names", values=list(parcae.preset_names()))
    for name in FAMILIES:
        _probe_family(rec, name)
    _probe_cli(rec, out, data)
    rec.save(out)


# ---------------------------------------------------------------------------------------------- parent side
def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def materialise(spec: str, into: Path) -> tuple[Path, str]:
    """The tree to probe for `spec` (a directory, or a git revision exported into `into`) and a label for it."""
    if Path(spec).is_dir():
        path = Path(spec).resolve()
        if not (path / "src" / "parcae").is_dir():
            print(f"{path} holds no src/parcae to compare.", file=sys.stderr)
            raise SystemExit(2)
        dirty = path == REPO and bool(_git("status", "--porcelain", "--", "src"))
        return path, f"{path}" + (" (working tree, uncommitted changes in src/)" if dirty else "")
    try:
        sha = _git("rev-parse", "--verify", f"{spec}^{{commit}}")
    except subprocess.CalledProcessError:
        print(f"{spec!r} is neither a directory nor a git revision of {REPO}.", file=sys.stderr)
        raise SystemExit(2) from None
    into.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", sha, "src"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {sha} failed")
    return into, f"{spec} ({sha[:10]})"


def write_corpus(path: Path, docs: int = 200, seed: int = 0) -> None:
    """A small deterministic JSONL corpus: enough documents that the run holds out a validation split."""
    words = ["the", "loop", "state", "depth", "model", "token", "river", "stone", "light", "seven", "blue", "runs"]
    rng = random.Random(seed)
    lines = []
    for _ in range(docs):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "."
        lines.append(json.dumps({"text": text}))
    path.write_text("\n".join(lines) + "\n")


def start_probe(tree: Path, out: Path, data: Path) -> subprocess.Popen[str]:
    out.mkdir(parents=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(tree / "src"),
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",  # nothing written into the trees under comparison
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(tree), "--out", str(out), "--data", str(data)]
    log = (out / "probe.log").open("w")
    return subprocess.Popen(cmd, env=env, cwd=str(out), stdout=log, stderr=subprocess.STDOUT, text=True)


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return [float(value)]
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _numbers(value[k])]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return []


def _value_diff(a: Any, b: Any) -> str:
    xs, ys = _numbers(a), _numbers(b)
    if len(xs) == len(ys) and xs:
        return f"values max |Δ| {max(abs(x - y) for x, y in zip(xs, ys, strict=True)):.3g}"
    return "values differ"


def _tensor_diff(old: Any, new: Any) -> float | str:
    if old.shape != new.shape:
        return f"shape {tuple(old.shape)} vs {tuple(new.shape)}"
    if old.dtype.is_floating_point and new.dtype.is_floating_point:
        return float((old.double() - new.double()).abs().nan_to_num(float("inf")).max()) if old.numel() else 0.0
    return f"{int((old != new).sum())} elements differ"


def compare(old_dir: Path, new_dir: Path) -> tuple[int, int]:
    """Print one line per item; return (identical, total)."""
    from safetensors.torch import load_file

    old_items = json.loads((old_dir / ITEMS_FILE).read_text())
    new_items = json.loads((new_dir / ITEMS_FILE).read_text())
    old_t, new_t = load_file(str(old_dir / TENSORS_FILE)), load_file(str(new_dir / TENSORS_FILE))
    names = list(old_items) + [n for n in new_items if n not in old_items]
    width = max(map(len, names))
    same = 0
    for name in names:
        a, b = old_items.get(name), new_items.get(name)
        if a is None or b is None:
            print(f"DIFFERENT  {name:<{width}}  missing on the {'old' if a is None else 'new'} side")
            continue
        count = len(a["tensors"])
        if json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True):
            same += 1
            print((f"same       {name:<{width}}" + (f"  ({count} tensors)" if count > 1 else "")).rstrip())
            continue
        notes: list[str] = []
        keys = sorted(set(a["tensors"]) | set(b["tensors"]))
        differing = [k for k in keys if a["tensors"].get(k, {}).get("sha256") != b["tensors"].get(k, {}).get("sha256")]
        diffs: list[tuple[float, str]] = []
        for k in differing:
            if k not in a["tensors"] or k not in b["tensors"]:
                notes.append(f"{k} only on the {'new' if k in b['tensors'] else 'old'} side")
                continue
            d = _tensor_diff(old_t[f"{name}|{k}"], new_t[f"{name}|{k}"])
            if isinstance(d, str):
                notes.append(f"{k}: {d}")
            else:
                diffs.append((d, k))
        if diffs:
            worst, where = max(diffs)
            label = f" at {where}" if len(keys) > 1 else ""
            notes.insert(0, f"{len(differing)}/{len(keys)} tensors differ, max |Δ| {worst:.3g}{label}")
        if json.dumps(a["values"], sort_keys=True) != json.dumps(b["values"], sort_keys=True):
            notes.append(_value_diff(a["values"], b["values"]))
        print(f"DIFFERENT  {name:<{width}}  " + "; ".join(notes))
    return same, len(names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", help="git revision (or directory holding src/) for the reference side")
    parser.add_argument("--new", default=str(REPO), help="git revision or directory (default: this working tree)")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (trees, runs, tensors)")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # internal: run the probe on this tree
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        probe(args.probe, args.out, args.data)
        return 0
    if args.old is None:
        parser.error("--old is required")

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="parcae-compare-"))
    try:
        old_tree, old_label = materialise(args.old, work / "old-tree")
        new_tree, new_label = materialise(args.new, work / "new-tree")
        print(f"old: {old_label}\nnew: {new_label}")
        data = work / "corpus.jsonl"
        write_corpus(data)
        procs = {side: start_probe(tree, work / side, data) for side, tree in (("old", old_tree), ("new", new_tree))}
        failed = [side for side, proc in procs.items() if proc.wait() != 0]
        for side in failed:
            print(f"probe on the {side} side failed:\n{(work / side / 'probe.log').read_text()}", file=sys.stderr)
        if failed:
            return 2
        same, total = compare(work / "old", work / "new")
        print(f"({time.perf_counter() - start:.0f} s)")
        print(f"bit-identical: {same}/{total} items")
        return 0 if same == total else 1
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
