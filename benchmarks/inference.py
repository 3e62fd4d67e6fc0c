"""Inference efficiency: Parcae's KV cache (policies, adaptive exit) vs the parameter-matched Transformer.

Two reference points live here only, not in the library: generation without a cache (the whole context
re-run for every token) and the official cache's design (docs/official-format.md: a dict of per-token K/V tensors
per unrolled layer, re-stacked on every update), plugged into the same model code as our cache.

Speed: greedy decoding of `--new-tokens` tokens after a `--prompt-len`-token prompt, batch 1 (latency) and
`--batch` (throughput), the median of `--repeats` runs, all settings in this one process. Prefill: one
cached forward over a `--prefill-len`-token prompt. Quality: teacher-forced decoding (the first token as
the prompt, then one cached forward per token, as in generation) of the trained run's validation rows under
each KV policy and exit setting, next to the full forward's loss at fixed depths (`loss_by_depth`).

Usage:
  python benchmarks/inference.py --run RUN [--gpt-run GPT_RUN]   # full run, ~10 min on 2 CPU cores
  python benchmarks/inference.py --run RUN --smoke               # a quick check that everything runs
RUN: a trained parcae-tiny run (`make demo`); GPT_RUN, optional: a trained gpt-tiny run, for the
matched-quality comparison. Last line: a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parcae import Parcae, ParcaeConfig, get_preset
from parcae.data.packing import val_batches
from parcae.data.shards import ShardStore
from parcae.eval.loss import loss_by_depth
from parcae.model.cache import Chunk, KVCache
from parcae.model.exit import ExitCriterion
from parcae.model.parcae import IGNORE_INDEX
from parcae.train.run import open_run

POLICIES = ("full", "budget:4", "budget:2", "last")
EXITS = ("latent:0.02", "latent:0.03", "latent:0.05", "kl:3e-4", "kl:1e-3", "argmax:2", "argmax:3")
SPEED_EXITS = ("latent:0.03", "kl:1e-3")
COMBINED = ("last", "latent:0.03")  # the sharing policy and the exit together


# ---------------------------------------------------------------------- the official cache design (reference)
class _RestackingLayer:
    """One unrolled layer of the official cache: per-position K/V tensors, re-stacked on every update."""

    def __init__(self, keys: dict[int, Tensor], values: dict[int, Tensor], chunk: Chunk) -> None:
        self.keys, self.values, self.chunk = keys, values, chunk
        self.attn_mask, self.is_causal = chunk.attn_mask, chunk.is_causal

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        for i, position in enumerate(range(self.chunk.start, self.chunk.end)):
            self.keys[position], self.values[position] = k[:, :, i], v[:, :, i]
        return torch.stack(list(self.keys.values()), dim=2), torch.stack(list(self.values.values()), dim=2)


class RestackingCache(KVCache):
    """The official `ParcaeDynamicCache`: step_idx = unrolled layer index → {position → [B, H, D]}.

    Reuses `KVCache`'s chunk bookkeeping (masks, positions); its preallocated tensors are one column and unused.
    Policy `full`, no adaptive exit: what the official generation supports.
    """

    def __init__(self, config: ParcaeConfig, batch_size: int, capacity: int, max_steps: int) -> None:
        super().__init__(config, batch_size, 1, max_steps=max_steps)
        self.capacity = capacity
        self.store: dict[int, tuple[dict[int, Tensor], dict[int, Tensor]]] = {}

    def _layer(self, step_idx: int) -> _RestackingLayer:
        keys, values = self.store.setdefault(step_idx, ({}, {}))
        return _RestackingLayer(keys, values, self._current())

    def outer_layer(self, index: int) -> _RestackingLayer:
        cfg = self.config
        coda = index - cfg.n_prelude
        return self._layer(index if coda < 0 else cfg.n_prelude + self.max_steps * cfg.n_core + coda)

    def core_layer(self, layer: int, iteration: int, keep: Tensor | None = None) -> _RestackingLayer:
        if keep is not None:
            raise NotImplementedError("the official cache design has no adaptive exit.")
        return self._layer(self.config.n_prelude + iteration * self.config.n_core + layer)

    def fill_skipped(self, done: int) -> None:
        raise NotImplementedError("the official cache design has no adaptive exit.")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.store.values() for d in kv for t in d.values())


# ---------------------------------------------------------------------- timing
class CachedDecoder:
    """Greedy decoding with `forward_cached` and a fresh cache from `make_cache` per run."""

    def __init__(self, model: Parcae, make_cache: Callable[[int], KVCache], exit: str | None = None) -> None:
        self.model, self.make_cache = model, make_cache
        self.exit = ExitCriterion.parse(exit) if exit else None

    def prefill(self, prompt: Tensor) -> Tensor:
        self.cache = self.make_cache(prompt.shape[0])
        self.iterations: list[Tensor] = []
        self.passes: list[int] = []
        return self._next(prompt)

    def step(self, token: Tensor) -> Tensor:
        return self._next(token)

    def _next(self, ids: Tensor) -> Tensor:
        out = self.model.forward_cached(ids, self.cache, exit=self.exit)
        self.iterations.append(out.iterations[:, -1])
        self.passes.append(out.coda_passes)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def stats(self) -> tuple[float, float, int]:
        """(mean core iterations per token, mean coda passes per forward, cache bytes)."""
        iterations = float(torch.stack(self.iterations).float().mean())
        return iterations, statistics.mean(self.passes), self.cache.nbytes()


class RecomputeDecoder:
    """Greedy decoding without a cache: the whole context re-run (`Parcae.forward`) for every new token."""

    def __init__(self, model: Parcae) -> None:
        self.model = model

    def prefill(self, prompt: Tensor) -> Tensor:
        self.context = [prompt]
        return self.step(None)

    def step(self, token: Tensor | None) -> Tensor:
        if token is not None:
            self.context.append(token)
        return self.model(torch.cat(self.context, 1)).logits[:, -1].argmax(-1, keepdim=True)

    def stats(self) -> tuple[float, float, int]:
        cfg = self.model.config
        return float(cfg.mean_recurrence if cfg.is_looped else 0), 1.0, 0


@dataclass
class Timing:
    prefill_s: float
    decode_s: float
    steps: int  # decode forwards
    batch: int
    iterations: float  # mean core iterations per generated token
    coda_passes: float  # mean readout + coda + head passes per forward
    cache_bytes: int
    tokens: list[int]  # row 0's greedy tokens (to check that the methods agree)
    last_s: float = 0.0  # decode time of the last tenth of the steps (longest contexts)

    @property
    def last_ms_per_step(self) -> float:
        return 1000 * self.last_s / max(1, self.steps // 10)

    @property
    def decode_tok_s(self) -> float:
        return self.batch * self.steps / self.decode_s

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.decode_s / self.steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def interleaved(decoders: dict[str, CachedDecoder | RecomputeDecoder], prompt: Tensor, new_tokens: int) -> dict:
    """Decode `new_tokens` greedy tokens with every decoder, one step of each in turn (rotating the order), so
    that load changes on a shared machine hit all of them alike. Returns {name: Timing}."""
    names = list(decoders)
    prefill = dict.fromkeys(names, 0.0)
    decode = dict.fromkeys(names, 0.0)
    last = dict.fromkeys(names, 0.0)
    tail = new_tokens - max(1, (new_tokens - 1) // 10)  # steps from here on form the last tenth
    tokens: dict[str, list[Tensor]] = {name: [] for name in names}
    for step in range(new_tokens):
        for name in names[step % len(names) :] + names[: step % len(names)]:
            decoder = decoders[name]
            _sync(prompt.device)
            started = time.perf_counter()
            token = decoder.prefill(prompt) if step == 0 else decoder.step(tokens[name][-1])
            _sync(prompt.device)
            elapsed = time.perf_counter() - started
            if step == 0:
                prefill[name] = elapsed
            else:
                decode[name] += elapsed
                last[name] += elapsed if step >= tail else 0.0
            tokens[name].append(token)
    timings = {}
    for name, decoder in decoders.items():
        iterations, passes, nbytes = decoder.stats()
        generated = torch.cat(tokens[name], 1)[0].tolist()
        timings[name] = Timing(prefill[name], decode[name], new_tokens - 1, prompt.shape[0], iterations, passes,
                               nbytes, generated, last[name])  # fmt: skip
    return timings


def repeated(decoders: dict, prompt: Tensor, new_tokens: int, repeats: int) -> dict[str, Timing]:
    """`interleaved` `repeats` times; per decoder the run with the median decode time (median prefill time)."""
    interleaved(decoders, prompt, min(new_tokens, 4))  # warm-up (first-call allocations), not timed
    runs = [interleaved(decoders, prompt, new_tokens) for _ in range(repeats)]
    result = {}
    for name in decoders:
        timings = sorted((run[name] for run in runs), key=lambda t: t.decode_s)
        mid = timings[len(timings) // 2]
        mid.prefill_s = statistics.median(t.prefill_s for t in timings)
        result[name] = mid
    return result


# ---------------------------------------------------------------------- FLOPs and bytes per decoded token
def _linear_params(*modules: nn.Module) -> int:
    return sum(m.weight.numel() for module in modules for m in module.modules() if isinstance(m, nn.Linear))


def decode_cost(model: Parcae, context: float, iterations: float, coda_passes: float = 1.0) -> dict:
    """Forward FLOPs and bytes moved to decode one token attending to `context` keys.

    FLOPs: 2 per matmul parameter and pass, 4·H·D per key and attention pass (QKᵀ, AV). Bytes: every pass
    reads its weights and its layer's K/V (the memory-bound view of decoding: nothing stays on chip); a KV
    sharing policy shrinks the cache, not these reads.
    """
    cfg = model.config
    element = next(model.parameters()).element_size()
    prelude, coda, head = _linear_params(*model.prelude), _linear_params(*model.coda), model.lm_head.weight.numel()
    outer_passes = cfg.n_prelude + coda_passes * cfg.n_coda
    matmul = prelude + coda_passes * (coda + head)
    kv_width = 2 * cfg.n_kv_heads * cfg.head_dim  # K and V elements per token and layer
    attention = 4 * cfg.n_heads * cfg.head_dim * context * outer_passes
    kv_read = kv_width * context * outer_passes
    if cfg.is_looped:
        core = _linear_params(*model.core)
        matmul += iterations * core + cfg.d_state * cfg.d_model + coda_passes * model.readout.weight.numel()
        attention += 4 * cfg.core_heads * cfg.head_dim * context * cfg.n_core * iterations
        kv_read += 2 * cfg.core_kv_heads * cfg.head_dim * context * cfg.n_core * iterations
    return {"flops": 2 * matmul + attention, "bytes": element * (matmul + kv_read)}


# ---------------------------------------------------------------------- quality
@torch.inference_mode()
def teacher_forced(model: Parcae, batches: list[tuple[Tensor, Tensor]], policy: str = "full",
                   exit: str | None = None, num_steps: int | None = None) -> dict:  # fmt: skip
    """Loss of token-by-token cached decoding (first token as the prompt) over `batches`."""
    criterion = ExitCriterion.parse(exit) if exit else None
    total = count = iterations = passes = tokens = 0.0
    kv_per_token = 0.0
    for inputs, labels in batches:
        batch, length = inputs.shape
        cache = model.new_cache(batch, length, kv_policy=policy, max_steps=num_steps)
        outs = [model.forward_cached(inputs[:, t : t + 1], cache, num_steps=num_steps, exit=criterion)
                for t in range(length)]  # fmt: skip
        logits = torch.cat([o.logits for o in outs], 1).float()
        used = torch.cat([o.iterations for o in outs], 1)
        mask = labels != IGNORE_INDEX
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int(mask.sum())
        iterations += float(used[mask].sum())
        passes += sum(o.coda_passes for o in outs) * batch
        tokens += batch * length
        kv_per_token = cache.bytes_per_token()
    return {"loss": total / count, "iterations": iterations / count, "coda_passes": passes / tokens,
            "kv_bytes_per_token": kv_per_token}  # fmt: skip


# ---------------------------------------------------------------------- main
def long_context(model: Parcae, max_seq_len: int, dtype: torch.dtype) -> Parcae:
    """The same weights with a longer context (RoPE and h₀ tables are derived, not stored)."""
    device = next(model.parameters()).device
    clone = Parcae(model.config.replace(max_seq_len=max_seq_len)).to(device).eval()
    clone.load_weights(model.state_dict())
    return clone.to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="trained parcae-tiny run (quality section; speed uses its weights)")
    parser.add_argument("--gpt-run", help="trained gpt-tiny run, for the matched-quality comparison")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="batch size of the throughput runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recompute-tokens", type=int, default=512, help="new tokens of the no-cache run")
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--val-rows", type=int, default=16)
    parser.add_argument("--val-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="speed section only")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that everything runs")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    if args.smoke:
        args.new_tokens, args.prompt_len, args.prefill_len, args.batch = 24, 8, 32, 2
        args.repeats, args.recompute_tokens, args.val_batches, args.val_rows, args.val_len = 1, 24, 1, 2, 24
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    # Models: the trained run's weights (or a fresh parcae-tiny) and a fresh parameter-matched gpt-tiny, both
    # with a context long enough for prompt + new tokens.
    context = max(args.prompt_len + args.new_tokens, args.prefill_len)
    trained = open_run(args.run, device=device) if args.run else None
    base = trained.model if trained else Parcae(get_preset("parcae-tiny")).to(device).eval()
    parcae = long_context(base, max(context, base.config.max_seq_len), dtype)
    gpt = Parcae(get_preset("gpt-tiny", max_seq_len=parcae.config.max_seq_len)).to(device, dtype).eval()
    depth = parcae.config.mean_recurrence
    vocab = trained.tokenizer.vocab_size if trained else 256
    prompt = torch.randint(0, vocab, (1, args.prompt_len), device=device)
    if trained and (Path(trained.path) / "data" / "val").is_dir():
        prompt = next(iter(_val(trained, 1, args.prompt_len, 1)))[0].to(device)
    prompts = prompt.expand(args.batch, -1).contiguous()
    print(f"parcae: {parcae.config.name} {parcae.num_parameters():,} params, T = {depth}; "
          f"gpt: {gpt.num_parameters():,} params; {device} {args.dtype}, {torch.get_num_threads()} threads; "
          f"weights: {'trained ' + args.run if trained else 'random'}")  # fmt: skip

    # ------------------------------------------------------------------ speed
    n, r = args.new_tokens, args.repeats
    cap = args.prompt_len + max(n, args.recompute_tokens)  # cache columns

    def cached(model: Parcae, policy: str = "full", exit: str | None = None, official: bool = False):
        if official:
            return CachedDecoder(model, lambda rows: RestackingCache(model.config, rows, cap, depth))
        return CachedDecoder(model, lambda rows: model.new_cache(rows, cap, kv_policy=policy), exit)

    latency = {f"parcae {policy}": cached(parcae, policy) for policy in ("full", "budget:2", "last")}
    latency.update({f"parcae full {spec}": cached(parcae, "full", spec) for spec in SPEED_EXITS})
    latency[f"parcae {' '.join(COMBINED)}"] = cached(parcae, *COMBINED)
    latency["gpt"] = cached(gpt)
    latency["parcae official-design cache"] = cached(parcae, official=True)
    speed = repeated(latency, prompt, n, r)
    # Without a cache every step re-runs the whole context: one run, interleaved with our cache as the yardstick.
    baseline = {"parcae full (again)": cached(parcae), "parcae no cache": RecomputeDecoder(parcae),
                "gpt no cache": RecomputeDecoder(gpt)}  # fmt: skip
    slow = repeated(baseline, prompt, args.recompute_tokens, 1)
    throughput = repeated({"parcae full": cached(parcae), "parcae last": cached(parcae, "last"), "gpt": cached(gpt)},
                          prompts, n, r)  # fmt: skip
    long_prompt = torch.randint(0, vocab, (1, args.prefill_len), device=device)
    prefill = repeated({name: CachedDecoder(model, lambda rows, m=model: m.new_cache(rows, args.prefill_len))
                        for name, model in (("parcae", parcae), ("gpt", gpt))}, long_prompt, 1, r)  # fmt: skip

    reference = speed["parcae full"]
    print(f"\nDecode, batch 1: {args.prompt_len}-token prompt + {n} new tokens, greedy, all settings interleaved "
          f"step by step, median of {r}; 'same tokens': greedy output equal to parcae full's")  # fmt: skip
    columns = ("tok/s", 8), ("ms/token", 9), ("last 10%", 9), ("iters", 6), ("KV MiB", 8), ("same tokens", 12)
    print(f"{'setting':<34} " + " ".join(f"{name:>{width}}" for name, width in columns))

    def show(table: dict[str, Timing], yardstick: Timing) -> None:
        for name, t in table.items():
            same = t.tokens == yardstick.tokens if "gpt" not in name else "-"
            print(f"{name:<34} {t.decode_tok_s:8.1f} {t.ms_per_step:9.2f} {t.last_ms_per_step:9.2f} "
                  f"{t.iterations:6.2f} {t.cache_bytes / 2**20:8.2f} {same!s:>12}")  # fmt: skip

    show(speed, reference)
    print(f"without a cache: {args.recompute_tokens} new tokens, 1 run, interleaved with parcae full again")
    show(slow, slow["parcae full (again)"])
    print(f"\nDecode throughput, batch {args.batch} (median of {r})")
    for name, t in throughput.items():
        print(f"{name:<34} {t.decode_tok_s:8.1f} tok/s {t.ms_per_step:9.2f} ms/step")
    print(f"\nPrefill: one cached forward over {args.prefill_len} tokens (median of {r})")
    for name, t in prefill.items():
        print(f"{name:<34} {args.prefill_len / t.prefill_s:8.0f} tok/s {1000 * t.prefill_s:9.1f} ms")

    # ------------------------------------------------------------------ cost per decoded token
    mid_context = args.prompt_len + n / 2
    costs = {f"parcae T={depth}": decode_cost(parcae, mid_context, depth), "gpt": decode_cost(gpt, mid_context, 0)}
    for spec in SPEED_EXITS:
        timing = speed[f"parcae full {spec}"]
        costs[f"parcae {spec}"] = decode_cost(parcae, mid_context, timing.iterations, timing.coda_passes)
    print(f"\nForward cost per decoded token at context {mid_context:.0f} (FLOPs; bytes read: weights + KV)")
    for name, c in costs.items():
        print(f"{name:<34} {c['flops'] / 1e6:8.2f} MFLOP {c['bytes'] / 2**20:8.2f} MiB")

    # ------------------------------------------------------------------ quality
    quality: dict[str, dict] = {}
    fixed: dict[int, float] = {}
    gpt_loss = None
    if trained and (Path(trained.path) / "data" / "val").is_dir():
        rows = _val(trained, args.val_batches, args.val_len, args.val_rows)
        batches = [(x.to(device), y.to(device)) for x, y in rows]
        model = trained.model
        fixed = {res.depth: res.loss for res in loss_by_depth(model, batches, sorted({1, 2, 3, 4, 5, 6, depth}))}
        for policy in POLICIES:
            quality[policy] = teacher_forced(model, batches, policy)
        for spec in EXITS:
            quality[f"full {spec}"] = teacher_forced(model, batches, "full", spec)
        quality[" ".join(COMBINED)] = teacher_forced(model, batches, *COMBINED)
        if args.gpt_run:
            gpt_trained = open_run(args.gpt_run, device=device).model
            gpt_loss = loss_by_depth(gpt_trained, batches, [1])[0].loss
        full = quality["full"]
        print(f"\nQuality: teacher-forced cached decoding, {sum(b[0].numel() for b in batches):,} validation tokens "
              f"(full forward at T = {depth}: {fixed[depth]:.4f})")  # fmt: skip
        print(f"{'setting':<26} {'loss':>8} {'Δ loss %':>9} {'iters':>6} {'saved %':>8} {'coda/tok':>9} "
              f"{'MFLOP/tok':>10} {'KV B/tok':>9} {'KV %':>6}")  # fmt: skip
        for name, q in quality.items():
            q["loss_cost_pct"] = 100 * (q["loss"] - full["loss"]) / full["loss"]
            q["iterations_saved_pct"] = 100 * (1 - q["iterations"] / depth)
            q["kv_pct"] = 100 * q["kv_bytes_per_token"] / full["kv_bytes_per_token"]
            q["flops_per_token"] = decode_cost(model, args.val_len / 2, q["iterations"], q["coda_passes"])["flops"]
            print(f"{name:<26} {q['loss']:8.4f} {q['loss_cost_pct']:9.2f} {q['iterations']:6.2f} "
                  f"{q['iterations_saved_pct']:8.1f} {q['coda_passes']:9.2f} {q['flops_per_token'] / 1e6:10.2f} "
                  f"{q['kv_bytes_per_token']:9.0f} {q['kv_pct']:6.1f}")  # fmt: skip
        print("fixed depth (full forward): " + ", ".join(f"T={d}: {loss:.4f}" for d, loss in fixed.items()))
        if gpt_loss is not None:
            print(f"trained gpt-tiny: {gpt_loss:.4f}")

    # ------------------------------------------------------------------ matched quality (with a trained gpt-tiny)
    matched = None
    if gpt_loss is not None:
        depths = [d for d, loss in sorted(fixed.items()) if loss <= gpt_loss]
        matched = {"gpt_loss": round(gpt_loss, 4), "parcae_depth": depths[0] if depths else None}
        if depths:
            parcae_cost = decode_cost(parcae, mid_context, depths[0])
            matched["flops_ratio"] = round(parcae_cost["flops"] / costs["gpt"]["flops"], 3)
            matched["bytes_ratio"] = round(parcae_cost["bytes"] / costs["gpt"]["bytes"], 3)
        print(f"matched quality: {matched}")

    # ------------------------------------------------------------------ summary
    restack = speed["parcae official-design cache"]
    sharing = [q for k, q in quality.items() if k in POLICIES and k != "full"]
    exits = [q for k, q in quality.items() if k.startswith("full ")]
    summary = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "new_tokens": n,
        "decode_tok_s": {k: round(t.decode_tok_s, 1) for k, t in speed.items()},
        "decode_ms_per_token": {k: round(t.ms_per_step, 3) for k, t in speed.items()},
        "no_cache_ms_per_token": {k: round(t.ms_per_step, 3) for k, t in slow.items()},
        "throughput_tok_s": {k: round(t.decode_tok_s, 1) for k, t in throughput.items()},
        "prefill_tok_s": {k: round(args.prefill_len / t.prefill_s, 1) for k, t in prefill.items()},
        "kv_bytes_per_token": {k: round(t.cache_bytes / cap) for k, t in speed.items() if t.cache_bytes},
        "flops_per_token": {k: round(c["flops"]) for k, c in costs.items()},
        "speedup_vs_official_design": round(restack.decode_s / reference.decode_s, 2),
        "speedup_vs_official_design_last_tenth": round(restack.last_s / reference.last_s, 2),
        "speedup_vs_no_cache": round(slow["parcae no cache"].decode_s / slow["parcae full (again)"].decode_s, 2),
        "quality": {k: {m: round(v, 4) for m, v in q.items()} for k, q in quality.items()},
        "fixed_depth_loss": {str(k): round(v, 4) for k, v in fixed.items()},
        "matched_quality": matched,
        "goals": {
            "decode_3x_official_design": restack.decode_s / reference.decode_s >= 3,
            "sharing_35pct_memory_1pct_loss": any(q["kv_pct"] <= 35 and q["loss_cost_pct"] <= 1 for q in sharing)
            if sharing else None,
            "exit_30pct_iterations_half_pct_loss": any(
                q["iterations_saved_pct"] >= 30 and q["loss_cost_pct"] <= 0.5 for q in exits
            ) if exits else None,
        },
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


def _val(run, batches: int, length: int, rows: int) -> list[tuple[Tensor, Tensor]]:
    store = ShardStore.open(Path(run.path) / "data", "val")
    return list(val_batches(store, length, rows, batches, pad_id=run.tokenizer.pad_id))


if __name__ == "__main__":
    main()
