"""Training step speed: Parcae as shipped vs the same model executed the official way, side by side.

Rows, in one process, with the same weights, batches and per-sequence depth samples:
- `parcae`    — our forward (compacted loop, hoisted invariants, chunked loss) + backward + optimizer step;
- `official`  — a reference mode that lives only here: every row runs the batch's maximum no-grad and grad
                depth and is frozen with `torch.where`, loop invariants (B·e, the decay, the value-embedding
                lookups) recomputed every iteration, full fp32 logits (all as the official code does,
                docs/official-format.md);
- `gpt`       — the fixed-depth Transformer of the same size (cost per token of looping).
Warm-up steps first, then A/B/C alternating measured steps; medians. Memory: peak CUDA allocation on GPU;
on CPU the bytes autograd saves for backward (the activation memory), counted with saved-tensor hooks.

The micro-batch defaults to the official 32 sequences (the depth spread the strategies differ on grows with it);
the sequence length is cut to fit a CPU. `--tuned-allocator` tunes glibc malloc for the whole process, as
`parcae train` does on CPU: both rows get faster, and the reference more (it allocates more).

Usage:
  python benchmarks/train_speed.py                     # CPU: tiny (32 × 128) and the 140M shape (32 × 32)
  python benchmarks/train_speed.py --configs tiny --steps 15 [--tuned-allocator] [--compile] [--batch 16]
  python benchmarks/train_speed.py --device cuda --configs 140m --seq-len 2048 --compile   # GPU, bf16 autocast
The last line is the median over measured steps of the paired ratio official/ours step time, for the last config.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from parcae import DepthPlan, DepthSampler, Parcae, get_preset
from parcae.scaling.flops import flops_per_token
from parcae.train.allocator import tune_cpu_allocator
from parcae.train.optim import OptimizerSettings, build_optimizer

# The micro-batch is the official one (32 sequences per GPU): the depth spread across a micro-batch
# is what the execution strategies differ on. The sequence length is what is cut to fit a CPU.
CONFIGS = {
    # name: (looped preset, fixed-depth preset, default micro-batch, default seq_len on CPU)
    "tiny": ("parcae-tiny", "gpt-tiny", 32, 128),
    "140m": ("parcae-140m", "gpt-140m", 32, 32),
}


def official_forward(model: Parcae, ids: Tensor, labels: Tensor, plan: DepthPlan, state_seed: int) -> Tensor:
    """The official execution strategy on our modules: masked loop over the batch maximum, invariants recomputed
    every iteration, full fp32 logits."""
    cfg = model.config
    cos, sin = model.rotary.tables(ids.shape[1])
    x = model.embed(ids)
    for i, block in enumerate(model.prelude):
        ve = model.value_embeds[str(i)](ids) if str(i) in model.value_embeds else None
        x = block(x, cos, sin, ve)
    e = model.prelude_norm(x) if model.prelude_norm is not None else x
    h = model._initial_state(e, state_seed, None)
    no_grad, grad = plan.no_grad.to(ids.device), plan.grad.to(ids.device)

    def core(state: Tensor) -> Tensor:
        drive, shared = model.injection.prepare(e)  # B·e and the decay: recomputed each iteration
        y = model.injection.step(state, drive, shared)
        for j, block in enumerate(model.core):
            key = str(cfg.n_prelude + j)
            ve = model.value_embeds[key](ids) if key in model.value_embeds else None  # lookup per iteration
            y = block(y, cos, sin, ve)
        return y

    with torch.no_grad():
        for step in range(int(plan.no_grad.max())):
            h = torch.where((step < no_grad)[:, None, None], core(h), h)
    for step in range(int(plan.grad.max())):
        h = torch.where((step < grad)[:, None, None], core(h), h)
    x = model.readout(h)
    offset = cfg.n_prelude + cfg.n_core
    for j, block in enumerate(model.coda):
        key = str(offset + j)
        x = block(x, cos, sin, model.value_embeds[key](ids) if key in model.value_embeds else None)
    logits = model.lm_head(model.final_norm(x)).float()  # [B, L, V] in fp32, all at once
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


# Dense bf16 tensor-core peaks (TFLOP/s) for MFU, by device name; anything else needs --peak-tflops.
PEAK_TFLOPS = {"NVIDIA H200": 989.4, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA A100-SXM4-80GB": 312.0}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def useful_flops_per_token(row: Row, plan: DepthPlan, seq_len: int) -> float:
    """Training FLOPs per token of the work the step was asked for: the sampled depths (the official way's masked
    passes are waste, not useful work); the fixed-depth row has no loop."""
    cfg = row.model.config
    if not cfg.is_looped:
        return flops_per_token(cfg, seq_len, causal=True).total
    no_grad, grad = float(plan.no_grad.float().mean()), float(plan.grad.float().mean())
    return flops_per_token(cfg, seq_len, no_grad=no_grad, grad=grad, causal=True).total


def official_ops(model: Parcae) -> None:
    """Give the reference model the official per-op forms where ours differ, so that
    block-level optimisations of ours are credited to ours: the composite ReLU² (0.5·relu(z)² through autograd).
    (Our RMSNorm already has the official form: a one-kernel variant measured no faster, docs/LOG.md.)"""
    for block in model.blocks():
        mlp = block.mlp
        mlp.forward = lambda x, mlp=mlp: mlp.down_proj(0.5 * F.relu(mlp.up_proj(x)).square())


def pass_cost_ratio(plan: DepthPlan, grad_weight: float = 3.0) -> float:
    """What skipping the masked passes alone can gain: core cost of the official loop over ours, counting a
    no-grad pass as 1 forward and a gradient pass as `grad_weight` (forward + backward ≈ 3; measured by
    pass_cost.py). Everything outside the loop and any per-pass speed-up come on top of (or dilute) this."""
    rows = plan.total.numel()
    official = rows * (int(plan.no_grad.max()) + grad_weight * int(plan.grad.max()))
    ours = int(plan.no_grad.sum()) + grad_weight * int(plan.grad.sum())
    return official / ours


class SavedBytes:
    """Bytes autograd keeps for backward (activation memory), counted with saved-tensor hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.total = 0
        # Weights (and views of them, such as transposes) are not activation memory.
        self._seen = {p.untyped_storage().data_ptr() for p in model.parameters()}

    @torch.compiler.disable  # bookkeeping, not model code: traced, its set would guard and recompile every step
    def pack(self, tensor: Tensor) -> Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.total += tensor.untyped_storage().nbytes()
        return tensor

    def context(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


@dataclass
class Row:
    name: str
    model: Parcae
    step: Callable[[Tensor, Tensor, DepthPlan, int], float]  # one training step; returns forward+backward seconds
    times: list[float]
    memory: list[float]
    forward_backward: list[float] = field(default_factory=list)
    model_flops: list[float] = field(default_factory=list)  # useful training FLOPs per measured step
    executed: int = 0
    sampled: int = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,140m", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, help="micro-batch (default per config)")
    parser.add_argument("--seq-len", type=int, help="sequence length (default per config)")
    parser.add_argument("--steps", type=int, default=9, help="measured steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile the blocks of every row (the official training script compiles its whole model)",
    )  # fmt: skip
    parser.add_argument(
        "--optimizer", default="adamw", choices=("adamw", "muon"),
        help="the same for every row; adamw by default because on a CPU with a few hundred tokens per step "
        "Muon's orthogonalisation (≈0.8 TFLOP per step at 140M) would dominate every row equally",
    )  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (known GPUs have a default)")
    parser.add_argument(
        "--profile", choices=("parcae", "official", "gpt"),
        help="run torch.profiler over that row's first measured step and print its top ops (that step's timing "
        "then includes the profiler's overhead)",
    )  # fmt: skip
    parser.add_argument(
        "--tuned-allocator", action="store_true",
        help="tune glibc malloc for the whole process, as `parcae train` does on CPU (parcae.train.allocator); "
        "it applies to every row alike",
    )  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.tuned_allocator and not tune_cpu_allocator():
        parser.error("--tuned-allocator: this C library is not glibc")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    allocator = "tuned glibc malloc" if args.tuned_allocator else "default allocator"
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {allocator}")
    ratio = float("nan")
    for name in args.configs.split(","):
        looped_name, fixed_name, batch, seq_len = CONFIGS[name]
        batch, seq_len = args.batch or batch, args.seq_len or seq_len
        ratio = run_config(looped_name, fixed_name, batch, seq_len, args, device, autocast)
    print(f"speed ratio ours/official (median of paired steps, {args.configs.split(',')[-1]}): {ratio:.2f}")


def run_config(looped_name, fixed_name, batch, seq_len, args, device, autocast) -> float:
    torch.manual_seed(0)
    cfg = get_preset(looped_name, max_seq_len=max(seq_len, 16))
    ours = Parcae(cfg).to(device)
    reference = Parcae(cfg).to(device)
    reference.load_state_dict(ours.state_dict())
    official_ops(reference)
    fixed = Parcae(get_preset(fixed_name, max_seq_len=max(seq_len, 16))).to(device)
    sampler = DepthSampler(cfg, seed=0)
    settings = OptimizerSettings(kind=args.optimizer)
    optimizers = {id(m): build_optimizer(m, settings) for m in (ours, reference, fixed)}

    def train_step(model: Parcae, compute_loss: Callable[[], Tensor]) -> float:
        """Forward + backward, then the optimizer step; returns the seconds spent in forward + backward."""
        model.train()
        start = time.perf_counter()
        with autocast:
            loss = compute_loss()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward_backward = time.perf_counter() - start
        optimizer = optimizers[id(model)]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return forward_backward

    rows = [
        Row("parcae", ours, lambda x, y, plan, s: train_step(
            ours, lambda: ours(x, labels=y, depth_plan=plan, state_seed=s, return_logits=False).loss), [], []),
        Row("official", reference, lambda x, y, plan, s: train_step(
            reference, lambda: official_forward(reference, x, y, plan, s)), [], []),
        Row("gpt", fixed, lambda x, y, plan, s: train_step(
            fixed, lambda: fixed(x, labels=y, return_logits=False).loss), [], []),
    ]  # fmt: skip
    if args.compile:  # every row, so that the ratio measures the execution strategy rather than the compiler
        for model in (ours, reference, fixed):
            model.compile_blocks()
    vocab = cfg.vocab_size
    print(f"\n{looped_name} vs {fixed_name}: micro-batch {batch} × {seq_len} tokens, μ_rec {cfg.mean_recurrence}")
    bound: list[float] = []
    profiler: torch.profiler.profile | None = None
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(step))
        x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)
        plan = sampler.sample(batch, seq_len, step)  # the same depths for both looped rows
        for row in rows:
            counter = SavedBytes(row.model)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            # On GPU the peak allocation is the memory figure: no per-tensor Python hooks in the timed step there.
            profiling = row.name == args.profile and step == args.warmup
            if profiling:
                profiler = torch.profiler.profile()
            with (
                counter.context() if device.type != "cuda" else contextlib.nullcontext(),
                profiler if profiling else contextlib.nullcontext(),
            ):
                forward_backward = row.step(x, y, plan, step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                row.model_flops.append(batch * seq_len * useful_flops_per_token(row, plan, seq_len))
                row.times.append(elapsed)
                row.forward_backward.append(forward_backward)
                peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else counter.total
                row.memory.append(peak / 2**20)
                if row.name == "parcae":
                    bound.append(pass_cost_ratio(plan))
                    row.sampled += int(plan.total.sum())
                    row.executed += int(plan.total.sum())  # the compacted loop runs exactly the sampled passes
                elif row.name == "official":
                    row.sampled += int(plan.total.sum())
                    row.executed += batch * (int(plan.no_grad.max()) + int(plan.grad.max()))
    if profiler is not None:
        print(f"\n{args.profile}: top ops of its first measured step, by self time")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    memory_kind = "peak CUDA MiB" if device.type == "cuda" else "saved-for-backward MiB"
    print(f"optimizer: {args.optimizer}; medians of {args.steps} alternating steps after {args.warmup} warm-up")
    peak = args.peak_tflops or PEAK_TFLOPS.get(device_name(device))
    print(f"{'row':<9} {'ms/step':>9} {'fwd+bwd ms':>11} {'tokens/s':>10} {memory_kind:>24} {'executed/sampled':>17} "
          f"{'model TFLOP/s':>14} {'MFU':>6}")  # fmt: skip
    speeds = {}
    for row in rows:
        ms = 1000 * statistics.median(row.times)
        speeds[row.name] = batch * seq_len / (ms / 1000)
        passes = f"{row.executed / row.sampled:.3f}" if row.sampled else "-"
        memory = statistics.median(row.memory)
        fb = 1000 * statistics.median(row.forward_backward)
        achieved = statistics.median(f / t for f, t in zip(row.model_flops, row.times, strict=True)) / 1e12
        mfu = f"{100 * achieved / peak:5.1f}%" if peak else "-"
        print(f"{row.name:<9} {ms:9.1f} {fb:11.1f} {speeds[row.name]:10.0f} {memory:24.1f} {passes:>17} "
              f"{achieved:14.3f} {mfu:>6}")  # fmt: skip
    print(f"model FLOPs: the sampled (useful) training work, parcae.scaling.flops_per_token with causal attention; "
          f"MFU against {f'{peak:g} TFLOP/s' if peak else 'no known peak (give --peak-tflops)'}")  # fmt: skip
    ratio = speeds["parcae"] / speeds["official"]
    fb_ratio = statistics.median(rows[1].forward_backward) / statistics.median(rows[0].forward_backward)
    # Paired: each measured step ran both rows back to back on the same batch and depths, so the median of the
    # per-step ratios is robust to the machine's speed drifting between steps (seen: ±8 % between runs here).
    paired = statistics.median(theirs / ours for ours, theirs in zip(rows[0].times, rows[1].times, strict=True))
    print(f"ours/official: step {ratio:.2f}× (ratio of medians), {paired:.2f}× (median of paired steps), "
          f"forward+backward {fb_ratio:.2f}×; "
          f"looped/fixed cost per token: {speeds['gpt'] / speeds['parcae']:.2f}")  # fmt: skip
    print(f"core-pass cost ratio official/ours at equal cost per pass (no-grad 1, grad 3): "
          f"{statistics.median(bound):.2f}")  # fmt: skip
    return paired


if __name__ == "__main__":
    main()
