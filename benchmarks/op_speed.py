"""Op-level speed behind the training-step choices of docs/LOG.md (issue 12), forward + backward, side by side.

Sections (each alternates its candidates, medians of `--reps` after 2 warm-up rounds):
- head:     the plain head (full fp32 logits + cross entropy) vs `linear_cross_entropy` at three chunk sizes,
            N × 768 × 32,768 (the 140M head);
- rmsnorm:  the one-kernel `F.rms_norm(x, D, weight)` (ours, fp32) vs the official composite;
- sdpa:     causal attention, the flash CPU kernel vs the math backend;
- qkv:      three projections vs one matmul on the concatenated weights;
- embedding: backward of a [32,768, 768] embedding (a fresh dense gradient each step) — run it once plain and once
            with `--tuned-allocator` (glibc malloc tuning is per process, as `parcae train` applies it on CPU).

Usage: python benchmarks/op_speed.py [head,rmsnorm,sdpa,qkv,embedding] [--reps 7] [--tuned-allocator]
Last line: the fused head's time over the plain head's at 32 Mi logits per chunk (the library default), 2,048 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from parcae.model.head import CHUNK_ELEMENTS, linear_cross_entropy
from parcae.train.allocator import tune_cpu_allocator

SECTIONS = ("head", "rmsnorm", "sdpa", "qkv", "embedding")


def compare(cases: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median milliseconds per case, the cases run round-robin so that drift hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(reps + 2):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            if rep >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def show(title: str, medians: dict[str, float]) -> None:
    base = next(iter(medians.values()))
    print(f"{title}: " + ", ".join(f"{name} {ms:.1f} ms ({base / ms:.2f}×)" for name, ms in medians.items()))


def backward_of(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    return lambda: forward().sum().backward()


def head(reps: int) -> float:
    return [head_at(tokens, reps) for tokens in (1024, 2048)][-1]


def head_at(tokens: int, reps: int, vocab: int = 32768, width: int = 768) -> float:
    hidden = torch.randn(tokens, width, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, width)).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    cases = {"plain": backward_of(lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels))}
    for elements in (1 << 21, 1 << 23, CHUNK_ELEMENTS):
        # Within one chunk the library takes the plain path; a chunk just under N forces the fused one.
        chunk = min(elements, (tokens - 1) * vocab)
        cases[f"fused {elements >> 20} Mi"] = backward_of(
            lambda chunk=chunk: linear_cross_entropy(hidden, weight, labels, chunk_elements=chunk)
        )
    medians = compare(cases, reps)
    show(f"head {tokens} × {width} × {vocab}", medians)
    return medians[f"fused {CHUNK_ELEMENTS >> 20} Mi"] / medians["plain"]


def rmsnorm(reps: int) -> None:
    for rows, width in ((2048, 128), (4096, 128), (1024, 768), (2048, 768)):
        rmsnorm_at(rows, width, reps)


def rmsnorm_at(rows: int, width: int, reps: int) -> None:
    x = torch.randn(rows, width, requires_grad=True)
    weight = torch.ones(width, requires_grad=True)
    composite = backward_of(lambda: F.rms_norm(x.float(), (width,), eps=1e-5).type_as(x) * weight)
    fused = backward_of(lambda: F.rms_norm(x, (width,), weight, 1e-5))
    show(f"rmsnorm [{rows}, {width}]", compare({"composite": composite, "fused": fused}, reps))


def sdpa(reps: int) -> None:
    for shape in ((16, 2, 128, 64), (4, 6, 128, 128), (32, 6, 64, 128), (8, 6, 512, 128), (2, 2, 1024, 64)):
        sdpa_at(shape, reps)


def sdpa_at(shape: tuple[int, ...], reps: int) -> None:
    q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))

    def attend(backend: SDPBackend) -> Callable[[], None]:
        def run() -> None:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        return run

    cases = {"math": attend(SDPBackend.MATH), "flash": attend(SDPBackend.FLASH_ATTENTION)}
    show(f"sdpa {list(shape)}", compare(cases, reps))


def qkv(reps: int) -> None:
    for rows, width in ((2048, 128), (4096, 128), (2048, 768)):
        qkv_at(rows, width, reps)


def qkv_at(rows: int, width: int, reps: int) -> None:
    x = torch.randn(rows, width, requires_grad=True)
    wq, wk, wv = (torch.randn(width, width, requires_grad=True) for _ in range(3))
    grads = [torch.randn(rows, width) for _ in range(3)]

    def separate() -> None:
        torch.autograd.backward([F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)], grads)

    def fused() -> None:
        torch.autograd.backward(list(F.linear(x, torch.cat([wq, wk, wv])).split(width, -1)), grads)

    show(f"qkv [{rows}, {width}]", compare({"separate": separate, "fused": fused}, reps))


def embedding(reps: int) -> None:
    table = torch.nn.Embedding(32768, 768)
    ids = torch.randint(0, 32768, (8, 128))

    def step() -> None:
        table(ids).sum().backward()
        table.weight.grad = None  # as zero_grad(set_to_none=True): the next backward allocates afresh

    show("embedding backward [32768, 768], 1,024 lookups", compare({"backward": step}, reps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sections", nargs="?", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS)
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--tuned-allocator", action="store_true", help="tune glibc malloc first (as parcae train)")
    args = parser.parse_args()
    chosen = args.sections.split(",")
    if unknown := set(chosen) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.tuned_allocator and not tune_cpu_allocator():
        parser.error("--tuned-allocator: this C library is not glibc")
    allocator = "tuned glibc malloc" if args.tuned_allocator else "default allocator"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {allocator}; medians of {args.reps}")
    runs = {"head": head, "rmsnorm": rmsnorm, "sdpa": sdpa, "qkv": qkv, "embedding": embedding}
    results = {section: runs[section](args.reps) for section in chosen}
    ratio = results.get("head") or float("nan")
    print(f"time fused head / plain head at {CHUNK_ELEMENTS >> 20} Mi logits per chunk, 2,048 tokens: {ratio:.2f}")


if __name__ == "__main__":
    main()
