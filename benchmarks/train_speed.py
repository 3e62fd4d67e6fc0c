"""Training step speed: Parcae as shipped vs the official code (or its execution strategy), side by side.

Rows, in one process, with the same weights, batches and per-sequence depth samples:
- `parcae`    — our forward (compacted loop, hoisted invariants, chunked loss) + backward + optimizer step;
- `official`  — with `--official DIR` (a checkout of github.com/sandyresearch/parcae): the authors' own `parcae_lm`
                model, built from our config and weights (`parcae.interop.to_parcae_lm`) and fed our depths.
                Without it, an *emulation* that lives only here: the official execution strategy on our modules
                (every row runs the batch's maximum no-grad and grad depth, frozen with `torch.where`; loop
                invariants — B·e, the decay, the value-embedding lookups — recomputed every iteration; full fp32
                logits; the composite ReLU²; docs/official-format.md). Which one ran is printed with the table;
- `gpt`       — the fixed-depth Transformer of the same size (cost per token of looping).
Warm-up steps first, then A/B/C alternating measured steps; medians. Memory: peak CUDA allocation on GPU;
on CPU the bytes autograd saves for backward (the activation memory), counted with saved-tensor hooks.

`--compile` compiles each row as it trains: ours and gpt with `Parcae.compile_loop` (`--set compile=true`: one
region per loop iteration, dynamic active rows), the official row as the official training script does
(`torch.compile(model, dynamic=False)`, inductor, default mode) — its loop is a `torch._dynamo.disable(
recursive=False)` frame, so every iteration is a compiled frame of its own and the masking runs eagerly between
them; the emulation is built the same way. It then also prints each row's first (cold-start) step and the graphs
compiled during the measured steps (0: no recompilation after warm-up).

The micro-batch defaults to the official 32 sequences (the depth spread the strategies differ on grows with it);
the sequence length is cut to fit a CPU. `--tuned-allocator` tunes glibc malloc for the whole process, as
`parcae train` does on CPU: both rows get faster, and the reference more (it allocates more).

Usage:
  python benchmarks/train_speed.py                     # CPU: tiny (32 × 128) and the 140M shape (32 × 32)
  python benchmarks/train_speed.py --configs tiny --steps 15 [--tuned-allocator] [--compile] [--batch 16]
  python benchmarks/train_speed.py --device cuda --configs 140m --seq-len 2048 --compile --official ../parcae
The last line is the median over measured steps of the paired ratio official/ours step time, for the last config.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters

from parcae import DepthPlan, DepthSampler, Parcae, ParcaeConfig, get_preset
from parcae.interop import to_parcae_lm
from parcae.scaling.flops import flops_per_token
from parcae.train.allocator import tune_cpu_allocator
from parcae.train.config import TrainConfig
from parcae.train.optim import build_optimizer

# The micro-batch is the official one (32 sequences per GPU): the depth spread across a micro-batch
# is what the execution strategies differ on. The sequence length is what is cut to fit a CPU.
CONFIGS = {
    # name: (looped preset, fixed-depth preset, default micro-batch, default seq_len on CPU)
    "tiny": ("parcae-tiny", "gpt-tiny", 32, 128),
    "140m": ("parcae-140m", "gpt-140m", 32, 32),
}


class OfficialStyle(nn.Module):
    """The emulation: the official execution strategy on our modules — masked loop over the batch maximum,
    invariants recomputed every iteration, full fp32 logits. Structured as the official model is, so that
    `torch.compile` treats it alike: the loop is a frame dynamo skips, each iteration a frame it compiles."""

    def __init__(self, model: Parcae) -> None:
        super().__init__()
        self.model = model
        # The next forward's (depth plan, h₀ seed): read by the loop only, as the official code samples its depths
        # there, so that no compiled frame guards on them.
        self.pending: tuple[DepthPlan, int] | None = None

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        model, cfg = self.model, self.model.config
        cos, sin = model.rotary.tables(ids.shape[1])
        x = model.embed(ids)
        for i, block in enumerate(model.prelude):
            ve = model.value_embeds[str(i)](ids) if str(i) in model.value_embeds else None
            x = block(x, cos, sin, ve)
        e = model.prelude_norm(x) if model.prelude_norm is not None else x
        x = model.readout(self.loop(e, ids, cos, sin))
        offset = cfg.n_prelude + cfg.n_core
        for j, block in enumerate(model.coda):
            key = str(offset + j)
            x = block(x, cos, sin, model.value_embeds[key](ids) if key in model.value_embeds else None)
        logits = model.lm_head(model.final_norm(x)).float()  # [B, L, V] in fp32, all at once
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    @torch._dynamo.disable(recursive=False)
    def loop(self, e: Tensor, ids: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        plan, state_seed = self.pending
        h = torch._dynamo.disable(self.model.initial_state)(e, state_seed, None)  # seeded h₀, not a compiled frame
        no_grad, grad = plan.no_grad.to(ids.device), plan.grad.to(ids.device)
        with torch.no_grad():
            for step in range(int(plan.no_grad.max())):
                h = torch.where((step < no_grad)[:, None, None], self.iteration(h, e, ids, cos, sin), h)
        for step in range(int(plan.grad.max())):
            h = torch.where((step < grad)[:, None, None], self.iteration(h, e, ids, cos, sin), h)
        return h

    def iteration(self, h: Tensor, e: Tensor, ids: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        model = self.model
        drive, shared = model.injection.prepare(e)  # B·e and the decay: recomputed each iteration
        y = model.injection.step(h, drive, shared)
        for j, block in enumerate(model.core):
            key = str(model.config.n_prelude + j)
            ve = model.value_embeds[key](ids) if key in model.value_embeds else None  # lookup per iteration
            y = block(y, cos, sin, ve)
        return y


def official_model(directory: str, ours: Parcae) -> tuple[nn.Module, list[DepthPlan]]:
    """The authors' `parcae_lm` model from a checkout, with our config and weights. It samples depths inside its
    loop (a frame dynamo skips); the list returned holds the plan its next forward uses instead."""
    sys.path.insert(0, directory)
    from parcae_lm.models.config import RoPESettings
    from parcae_lm.models.parcae.config import ParcaeConfig as OfficialConfig

    state, config = to_parcae_lm(ours)
    config = {key: value for key, value in config.items() if key != "_class_name"}
    config["rope_settings"] = RoPESettings(**config["rope_settings"])
    model = OfficialConfig(**config).construct_model()
    model.load_state_dict(state)
    plans: list[DepthPlan] = []
    model._sample_batch_depths = torch._dynamo.disable(lambda batch, seq_len: (plans[0].no_grad, plans[0].grad))
    return model, plans


# Dense bf16 tensor-core peaks (TFLOP/s) for MFU, by device name; anything else needs --peak-tflops.
PEAK_TFLOPS = {"NVIDIA H200": 989.4, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA A100-SXM4-80GB": 312.0}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def useful_flops_per_token(row: Row, plan: DepthPlan, seq_len: int) -> float:
    """Training FLOPs per token of the work the step was asked for: the sampled depths (the official way's masked
    passes are waste, not useful work); the fixed-depth row has no loop."""
    cfg = row.config
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
    model: nn.Module
    config: ParcaeConfig  # for the useful FLOPs
    step: Callable[[Tensor, Tensor, DepthPlan, int], float]  # one training step; returns forward+backward seconds
    times: list[float] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)
    forward_backward: list[float] = field(default_factory=list)
    model_flops: list[float] = field(default_factory=list)  # useful training FLOPs per measured step
    executed: int = 0
    sampled: int = 0
    first_step: float = 0.0  # seconds (compiled: the cold start)
    graphs: int = 0  # graphs dynamo compiled during the measured steps


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
        help="compile every row: ours with Parcae.compile_loop, the official as its training script does",
    )  # fmt: skip
    parser.add_argument("--official", metavar="DIR", help="a checkout of the official code: time it, not the emulation")
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
    fixed = Parcae(get_preset(fixed_name, max_seq_len=max(seq_len, 16))).to(device)
    if args.official:
        official, next_plan = official_model(args.official, ours)
        optimized = official.to(device)
        described = f"the authors' code from {args.official}"

        def official_loss(run: nn.Module, x: Tensor, y: Tensor, plan: DepthPlan, state_seed: int) -> Tensor:
            next_plan[:] = [plan]
            return run(x, labels=y.contiguous())["loss"]
    else:
        reference = Parcae(cfg).to(device)
        reference.load_state_dict(ours.state_dict())
        official_ops(reference)
        official, optimized = OfficialStyle(reference), reference
        described = "the emulation of the official execution on our modules"

        def official_loss(run: nn.Module, x: Tensor, y: Tensor, plan: DepthPlan, state_seed: int) -> Tensor:
            official.pending = (plan, state_seed)
            return run(x, y)

    run_official = official
    if args.compile:  # every row, as each trains compiled: ours region by region, the official whole
        ours.compile_loop()
        fixed.compile_loop()
        run_official = torch.compile(official, dynamic=False)  # the official scripts/train.py call (inductor)
    sampler = DepthSampler(cfg, seed=0)
    settings = TrainConfig(optimizer=args.optimizer)
    pairs = ((ours, ours), (official, optimized), (fixed, fixed))  # (what a row trains, whose parameters)
    optimizers = {id(model): build_optimizer(params, settings) for model, params in pairs}

    def train_step(model: nn.Module, compute_loss: Callable[[], Tensor]) -> float:
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
        Row("parcae", ours, cfg, lambda x, y, plan, s: train_step(
            ours, lambda: ours(x, labels=y, depth_plan=plan, state_seed=s, return_logits=False).loss)),
        Row("official", official, cfg, lambda x, y, plan, s: train_step(
            official, lambda: official_loss(run_official, x, y, plan, s))),
        Row("gpt", fixed, fixed.config, lambda x, y, plan, s: train_step(
            fixed, lambda: fixed(x, labels=y, return_logits=False).loss)),
    ]  # fmt: skip
    vocab = cfg.vocab_size
    print(f"\n{looped_name} vs {fixed_name}: micro-batch {batch} × {seq_len} tokens, μ_rec {cfg.mean_recurrence}; "
          f"official: {described}{', all compiled' if args.compile else ''}")  # fmt: skip
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
            graphs = counters["stats"]["unique_graphs"]
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
            if step == 0:
                row.first_step = elapsed
            if step >= args.warmup:
                row.graphs += counters["stats"]["unique_graphs"] - graphs
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
    if args.compile:
        print(
            "compiled: first step (cold start) "
            + ", ".join(f"{r.name} {r.first_step:.1f} s" for r in rows)
            + "; graphs compiled during the measured steps "
            + ", ".join(f"{r.name} {r.graphs}" for r in rows)
        )
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
