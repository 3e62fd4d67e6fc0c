"""The Parcae model: embed → prelude → norm → loop (inject, core × T) → C → coda → norm → head (`n_core = 0`: fixed
depth). Every path shares `loop_inputs`, `step` (h ← Ā·h + B̄·e + R̄(h, e)) and `after_loop` (readout → coda → norm)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .cache import CachedOutput, KVCache, KVPolicy
from .compiled import compile_blocks, compile_loop
from .config import ParcaeConfig
from .exit import ExitCriterion
from .generate import generate
from .head import IGNORE_INDEX, linear_cross_entropy, mean_cross_entropy
from .injection import build_injection
from .io import Pretrained
from .layers import Block, RMSNorm, Rotary, scaled_orthogonal_
from .recurrence import DepthPlan, DepthSampler, LoopInputs, run_loop

_STATE_SEED_SALT = 0x5EED  # keeps h₀'s seeded stream apart from the depth sampler's
# Cached attention on CUDA avoids cuDNN's SDPA: it builds an execution plan for every new key length, i.e. every
# decode step (≈ 5 ms of CPU per call on an H200, more than the whole step's GPU work). The CPU's choice is the same.
_CACHED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class ParcaeOutput:
    """`loss` (mean CE over labelled tokens), `logits` [B, L, V] and, when looped, `metrics`: `rho_A` ρ(Ā), token means
    `state_norm` ‖h_T‖₂ and `recurrent_residual` ‖h_T − h_{T−1}‖₂, `mean_depth`, `sampled_core_passes` Σ_rows T_row and
    `executed_core_passes`; tensors are detached 0-d (no device sync until read), pass counts Python numbers."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class DepthOutput:
    """One depth of `Parcae.iterate_depths`: final-norm hidden [B, L, d] (logits: `lm_head(hidden)`), h_t, h_{t−1}."""

    depth: int
    hidden: Tensor
    state: Tensor | None = None
    previous_state: Tensor | None = None


class Parcae(Pretrained):
    def __init__(self, config: ParcaeConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Value-embedding tables by distinct-layer index (prelude 0.., core, coda): the core's serve every iteration.
        ve_layers = [i for i in range(cfg.n_layers) if cfg.has_value_embedding(i)]
        widths = {i: (cfg.core_kv_heads if self._is_core(i) else cfg.n_kv_heads) * cfg.head_dim for i in ve_layers}
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(cfg.vocab_size, width) for i, width in widths.items()})
        self.prelude = nn.ModuleList(self._block(i) for i in range(cfg.n_prelude))
        if cfg.is_looped:
            self.prelude_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.prelude_norm else None
            self.injection = build_injection(cfg.injection, cfg.d_state, cfg.d_model)
            self.core = nn.ModuleList(self._block(cfg.n_prelude + j) for j in range(cfg.n_core))
            self.readout = nn.Linear(cfg.d_state, cfg.d_model, bias=False)  # the paper's C
        self.coda = nn.ModuleList(self._block(cfg.n_prelude + cfg.n_core + j) for j in range(cfg.n_coda))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.depth_sampler = DepthSampler(cfg)
        self._state_tables: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}  # seeded h₀, per position
        self.tie_weights()
        self.reset_parameters()

    def _is_core(self, layer: int) -> bool:
        return self.config.n_prelude <= layer < self.config.n_prelude + self.config.n_core

    def _block(self, layer: int) -> Block:
        return Block(self.config, core=self._is_core(layer), value_gate=self.config.has_value_embedding(layer))

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init (official `scaled-zero` + orthogonal; docs/official-format.md, Initialization)."""
        std = self.config.init_std
        scaled_orthogonal_(self.embed.weight, std)
        if not self.config.tie_embeddings:
            scaled_orthogonal_(self.lm_head.weight, std)
        for table in self.value_embeds.values():
            nn.init.normal_(table.weight)  # N(0, 1): nn.Embedding's default, as the official code
        for block in self.blocks():
            block.reset_parameters(std)
        if self.config.is_looped:
            if self.prelude_norm is not None:
                self.prelude_norm.weight.fill_(1.0)
            self.injection.reset_parameters(std)
            scaled_orthogonal_(self.readout.weight, std)
        self.final_norm.weight.fill_(1.0)

    compile_loop = compile_loop  # training regions under torch.compile (`parcae.model.compiled`)
    compile_blocks = compile_blocks

    def blocks(self) -> list[Block]:
        return [*self.prelude, *(self.core if self.config.is_looped else ()), *self.coda]

    def loop_inputs(
        self, input_ids: Tensor, *, positions: int | Tensor = 0, cache: KVCache | None = None
    ) -> LoopInputs:
        """Everything before the loop, once per forward: embed → prelude P → e = RMSNorm(P(x)) → B̄·e (ids unchecked).
        `positions`: the first position or each token's [B, L] (left padding); `cache`: its prelude slots are used."""
        cfg = self.config
        cos, sin = self.rotary.tables(input_ids.shape[1], positions)
        value_embeds = {int(i): table(input_ids) for i, table in self.value_embeds.items()}
        x = self.embed(input_ids)
        for i, block in enumerate(self.prelude):
            x = block(x, cos, sin, value_embeds.get(i), cache.outer_layer(i) if cache is not None else None)
        inputs = LoopInputs(x=x, cos=cos, sin=sin, value_embeds=value_embeds)
        if cfg.is_looped:
            inputs.e = self.prelude_norm(x) if self.prelude_norm is not None else x
            inputs.drive, inputs.decay = self.injection.prepare(inputs.e)  # B̄·e and Ā: loop invariants
            inputs.core_embeds = tuple(value_embeds.get(cfg.n_prelude + j) for j in range(cfg.n_core))
        return inputs

    def step(
        self,
        h: Tensor,
        inputs: LoopInputs,
        *,
        cache: KVCache | None = None,
        iteration: int = 0,
        keep: Tensor | None = None,
    ) -> Tensor:
        """h_{t+1} = Ā·h_t + B̄·e + R̄(h_t, e) for any subset of rows (`inputs` sliced alike, `LoopInputs.rows`); with a
        cache, the core uses `iteration`'s slots, storing keys and values of the tokens still iterating (`keep`)."""
        y = self.injection.step(h, inputs.drive, inputs.decay)
        for j, block in enumerate(self.core):
            slot = cache.core_layer(j, iteration, keep=keep) if cache is not None else None
            y = block(y, inputs.cos, inputs.sin, inputs.core_embeds[j], slot)
        return y

    def after_loop(
        self, h: Tensor, inputs: LoopInputs, *, cache: KVCache | None = None, last_only: bool = False
    ) -> Tensor:
        """Readout C (looped) → coda → final norm: the hidden state the head reads (fixed depth: of the prelude output).
        `last_only` keeps the last position (the coda still runs, and caches, every position)."""
        cfg = self.config
        x = self.readout(h) if cfg.is_looped else h
        for j, block in enumerate(self.coda):
            slot = cache.outer_layer(cfg.n_prelude + j) if cache is not None else None
            x = block(x, inputs.cos, inputs.sin, inputs.value_embeds.get(cfg.n_prelude + cfg.n_core + j), slot)
        return self.final_norm(x[:, -1:] if last_only else x)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        num_steps: int | None = None,
        depth_plan: DepthPlan | None = None,
        step: int | None = None,
        state_seed: int | None = None,
        return_logits: bool = True,
    ) -> ParcaeOutput:
        """Depth: `depth_plan`; else `num_steps` (fixed; in training the last μ_bwd steps carry gradient); else, in
        training, sampled per `config.depth_sampling` (from (seed, `step`, rank) when `step` is given); else (eval,
        which never samples) `mean_recurrence`. h₀ is seeded by `state_seed` (eval default 0: deterministic).
        `return_logits=False` with labels skips materialising [B, L, V] logits (chunked loss)."""
        batch, seq_len = self._check_inputs(input_ids, labels)
        plan = self._depth_plan(batch, seq_len, num_steps, depth_plan, step) if self.config.is_looped else None
        inputs = self.loop_inputs(input_ids)
        x, metrics = inputs.x, {}
        if plan is not None:
            loop = run_loop(self.step, self.initial_state(inputs.e, state_seed, step), plan, inputs)
            metrics = {
                "rho_A": self.injection.spectral_radius(),
                "state_norm": loop.state.detach().float().norm(dim=-1).mean(),
                "recurrent_residual": loop.residual,
                "mean_depth": loop.sampled_passes / batch,
                "sampled_core_passes": loop.sampled_passes,
                "executed_core_passes": loop.executed_passes,
            }
            x = loop.state
        x = self.after_loop(x, inputs)
        if labels is not None and not return_logits:
            return ParcaeOutput(loss=self.chunked_loss(x, labels), metrics=metrics)
        logits = self.lm_head(x)
        loss = None if labels is None else mean_cross_entropy(logits.float(), labels)
        return ParcaeOutput(loss=loss, logits=logits, metrics=metrics)

    @torch.no_grad()
    def logits_by_depth(self, input_ids: Tensor, depths: Sequence[int], *, state_seed: int = 0) -> dict[int, Tensor]:
        """Eval logits [B, L, V] by depth from ONE run of the loop (`iterate_depths`), each `forward(num_steps=t)`'s."""
        return {out.depth: self.lm_head(out.hidden) for out in self.iterate_depths(input_ids, depths, state_seed)}

    @torch.no_grad()
    def iterate_depths(self, input_ids: Tensor, depths: Sequence[int], state_seed: int = 0) -> Iterator[DepthOutput]:
        """Eval outputs at each requested depth, increasing, from one run of the loop (h_t does not depend on later
        iterations): Σ depths core passes become max(depths). A fixed-depth model yields its one output per depth."""
        wanted = sorted(set(depths))
        if not wanted or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in wanted):
            raise ValueError(f"depths must be positive integers, got {list(depths)!r}.")
        self._check_inputs(input_ids, None)
        if self.training:
            raise ValueError("iterate_depths / logits_by_depth evaluate: call model.eval() first.")
        inputs = self.loop_inputs(input_ids)
        if not self.config.is_looped:
            hidden = self.after_loop(inputs.x, inputs)
            yield from (DepthOutput(t, hidden) for t in wanted)
            return
        h = self.initial_state(inputs.e, state_seed, None)
        for t in range(1, wanted[-1] + 1):
            previous, h = h, self.step(h, inputs)
            if t in wanted:
                yield DepthOutput(t, self.after_loop(h, inputs), state=h, previous_state=previous)

    def _check_inputs(self, input_ids: Tensor, labels: Tensor | None) -> tuple[int, int]:
        """Clear errors before any compute (one device sync for the value-range check)."""
        cfg = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, seq_len] tensor, got {shape}.")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
        batch, seq_len = input_ids.shape
        if batch == 0 or seq_len == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}).")
        if seq_len > cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {cfg.max_seq_len}.")
        checks = [input_ids.min(), input_ids.max()]
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}.")
            valid = labels[labels != IGNORE_INDEX]
            if valid.numel():
                checks += [valid.min(), valid.max()]
        ranges = torch.stack(checks).tolist()
        if ranges[0] < 0 or ranges[1] >= cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got ids in {ranges[:2]}.")
        if len(ranges) > 2 and (ranges[2] < 0 or ranges[3] >= cfg.vocab_size):
            raise ValueError(f"labels must lie in [0, {cfg.vocab_size}) or be {IGNORE_INDEX}, got {ranges[2:]}.")
        return batch, seq_len

    def _depth_plan(
        self, batch: int, seq_len: int, num_steps: int | None, depth_plan: DepthPlan | None, step: int | None
    ) -> DepthPlan:
        if depth_plan is not None:
            depth_plan.check(batch, seq_len)
            return depth_plan
        if num_steps is not None or not self.training:
            depth = self._inference_depth(num_steps)
            # Training truncates backprop to the last μ_bwd steps; eval leaves gradients to the caller.
            return DepthPlan.fixed(batch, depth, self.config.backprop_depth if self.training else depth)
        return self.depth_sampler.sample(batch, seq_len, step)

    def initial_state(self, e: Tensor, state_seed: int | None, step: int | None, positions: Tensor | int = 0) -> Tensor:
        """h₀ for e [B, L, ·]. Seeded (`state_seed`, or 0 in eval): one vector per *position* (`positions`: the first,
        or per token [B, L]), shared by all rows, so a cached decode reproduces the full forward and an eval output
        never depends on batch neighbours. Training draws per row from (seed, `step`, rank), or the global RNG."""
        cfg = self.config
        shape = (*e.shape[:-1], cfg.d_state)
        if cfg.state_init == "zero":
            return torch.zeros(shape, dtype=e.dtype, device=e.device)
        if state_seed is None and self.training:
            generator = None if step is None else self.depth_sampler.generator(step, _STATE_SEED_SALT, e.device)
            return _random_state(torch.empty(shape, dtype=e.dtype, device=e.device), cfg, generator)
        seed = 0 if state_seed is None else state_seed
        key = (seed, e.device, e.dtype)
        if key not in self._state_tables:  # seeded h₀ [max_seq_len, S], drawn on the CPU: same values on any device
            with torch.inference_mode(False):  # a normal tensor, usable by later training-mode forwards
                generator = torch.Generator().manual_seed(seed)
                table = _random_state(torch.empty(cfg.max_seq_len, cfg.d_state), cfg, generator).to(e.device, e.dtype)
            if len(self._state_tables) >= 8:
                self._state_tables.clear()
            self._state_tables[key] = table
        table = self._state_tables[key]
        if isinstance(positions, Tensor):
            return table[positions]
        return table[positions : positions + shape[-2]].expand(shape).clone()

    def new_cache(
        self, batch_size: int, capacity: int, *, kv_policy: str | KVPolicy = "full", max_steps: int | None = None
    ) -> KVCache:
        """An empty KV cache in the model's device and dtype; `max_steps`: iterations it holds (default μ_rec)."""
        param = next(self.parameters())
        options = dict(policy=kv_policy, max_steps=max_steps, device=param.device, dtype=param.dtype)
        return KVCache(self.config, batch_size, capacity, **options)

    @torch.inference_mode()
    @sdpa_kernel(_CACHED_SDPA)  # set once per cached forward, not per attention call
    def forward_cached(
        self,
        input_ids: Tensor,
        cache: KVCache,
        *,
        num_steps: int | None = None,
        exit: ExitCriterion | None = None,
        attention_mask: Tensor | None = None,
        state_seed: int = 0,
        last_logits_only: bool = False,
    ) -> CachedOutput:
        """Inference over new tokens [B, n] (prompt, then decode steps), extending `cache`; `full` policy, no exit: the
        eval forward's logits (same `state_seed`). Depth `num_steps` (default μ_rec), with `exit` the most per token
        (then frozen). `attention_mask` [B, n] (first chunk): 0 = left padding. `last_logits_only`: [B, 1, V]."""
        cfg = self.config
        batch, n = self._check_inputs(input_ids, None)
        if batch != cache.batch_size:
            raise ValueError(f"the cache was made for {cache.batch_size} rows, got {batch}.")
        if exit is not None and not cfg.is_looped:
            raise ValueError("adaptive exit needs a looped model (n_core > 0).")
        chunk = cache.begin(n, attention_mask)
        positions = chunk.positions if chunk.positions is not None else chunk.start
        inputs = self.loop_inputs(input_ids, positions=positions, cache=cache)
        x, logits, coda_passes = inputs.x, None, 0
        iterations = torch.zeros(batch, n, dtype=torch.long, device=input_ids.device)
        if cfg.is_looped:
            steps = cache.check_steps(self._inference_depth(num_steps, exit))
            h = self.initial_state(inputs.e, 0 if state_seed is None else state_seed, None, positions)
            tracker = exit.tracker((batch, n), input_ids.device) if exit is not None else None
            active: Tensor | None = None  # [B, n]: tokens still iterating; None = all
            for done in range(1, steps + 1):
                y = self.step(h, inputs, cache=cache, iteration=done - 1, keep=active)
                h_prev, h = h, y if active is None else torch.where(active.unsqueeze(-1), y, h)
                iterations += 1 if active is None else active
                if tracker is None:
                    continue
                logits = None  # a probe after the last iteration doubles as the output
                if tracker.wants_logits(done):
                    logits = self.lm_head(self.after_loop(h, inputs, cache=cache))
                    coda_passes += 1
                active = ~tracker.update(done, h_prev, h, logits)
                if chunk.real is not None:
                    active &= chunk.real
                if not bool(active.any()):
                    break
            if done < cache.max_steps:
                cache.fill_skipped(done)
            x = h
            if chunk.real is not None:
                iterations *= chunk.real
        if logits is None:
            logits = self.lm_head(self.after_loop(x, inputs, cache=cache, last_only=last_logits_only))
            coda_passes += 1
        elif last_logits_only:  # an exit probe's logits: already computed for every position
            logits = logits[:, -1:]
        cache.commit()
        return CachedOutput(logits=logits, iterations=iterations, coda_passes=coda_passes)

    def _inference_depth(self, num_steps: int | None, exit: ExitCriterion | None = None) -> int:
        limit = exit.max_steps if exit is not None else None
        if num_steps is not None and limit is not None and num_steps != limit:
            raise ValueError(f"num_steps {num_steps} and the exit criterion's max_steps {limit} disagree.")
        depth = next((steps for steps in (num_steps, limit) if steps is not None), self.config.mean_recurrence)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"num_steps must be a positive integer, got {depth!r}.")
        if exit is not None and exit.min_steps > depth:
            raise ValueError(f"the exit's min_steps {exit.min_steps} exceed the depth {depth}.")
        return depth

    generate = generate  # `parcae.model.generate.generate`: KV-cached sampling (the model is its first argument)

    def chunked_loss(self, x: Tensor, labels: Tensor) -> Tensor:
        """Mean CE of the head on final hidden states x without materialising all logits (`model.head`)."""
        return linear_cross_entropy(x, self.lm_head.weight, labels)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _random_state(h: Tensor, cfg: ParcaeConfig, generator: torch.Generator | None) -> Tensor:
    """Fill h with the configured h₀ distribution: truncated (±3σ) normal (`like-init`) or normal, σ = init std."""
    std = cfg.init_std
    if cfg.state_init == "like-init":
        return nn.init.trunc_normal_(h, std=std, a=-3 * std, b=3 * std, generator=generator)
    return h.normal_(0.0, std, generator=generator)


def count_params(cfg: ParcaeConfig) -> int:
    """Exact number of unique parameters (tied embeddings counted once), built on the meta device."""
    with torch.device("meta"):
        return Parcae(cfg).num_parameters()
