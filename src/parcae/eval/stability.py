"""The loop map F(h) = `Parcae.step(h, inputs)` and its Jacobian spectrum: ρ(J) = max_i ρ(J_ii), J being block lower
triangular in tokens (the README's "Jacobian spectral radius"). Reverse mode only: on CPU 4–15× faster than jvp."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..model.parcae import Parcae
from ..model.recurrence import LoopInputs
from .scoring import evaluating

MatVec = Callable[[Tensor], Tensor]
# A Krylov direction shorter than this fraction of its vector is breakdown: fp32 matvecs make anything less noise.
_BREAKDOWN = 1e-6


@dataclass
class LoopMap:
    """F(h) = `model.step(h, inputs)` for fixed input ids: a pure function of a state h [B, L, d_state]."""

    model: Parcae
    inputs: LoopInputs

    def __call__(self, h: Tensor) -> Tensor:
        return self.model.step(h, self.inputs)

    @torch.no_grad()
    def run(self, steps: int) -> Tensor:
        """h_T after `steps` iterations, without gradient, from the seeded h₀ that `model(ids, num_steps=T)` uses."""
        h = self.model.initial_state(self.inputs.e, 0, None)
        for _ in range(steps):
            h = self(h)
        return h


def loop_map(model: Parcae, input_ids: Tensor) -> LoopMap:
    """The loop of `model` for `input_ids`; everything before it runs once, without gradient."""
    cfg = model.config
    if not cfg.is_looped:
        raise ValueError(f"{cfg.name} has no loop (n_core = 0), so it has no loop map.")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError("input_ids must be a [batch, seq_len] tensor of token ids.")
    if input_ids.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len {cfg.max_seq_len}.")
    with torch.no_grad():
        return LoopMap(model=model, inputs=model.loop_inputs(input_ids))


class _WithAttention(TorchFunctionMode):
    """The loop map with `F.scaled_dot_product_attention` run as `composite_attention` by every core block."""

    def __init__(self, fmap: LoopMap, token_local: bool) -> None:
        super().__init__()
        self.fmap, self.token_local, self.calls = fmap, token_local, 0

    def __call__(self, h: Tensor) -> Tensor:
        self.calls, blocks = 0, len(self.fmap.model.core)
        with self:
            out = self.fmap(h)
        if self.calls != blocks:
            why = "the Jacobian needs every cross-token interaction to go through that function"
            raise RuntimeError(f"{self.calls} scaled_dot_product_attention calls for {blocks} core blocks; {why}.")
        return out

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return composite_attention(*args, token_local=self.token_local, **kwargs)
        return func(*args, **kwargs)


def composite_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    token_local: bool = False,
) -> Tensor:
    """`scaled_dot_product_attention` in plain ops, so every derivative (the double backward too) exists.
    `token_local`: other tokens' keys and values are constants; token i's re-enter through the zero-valued terms
    q_i·(k_i − k̂_i) and p_ii·(v_i − v̂_i) (k̂ = detached k), so the Jacobian is exactly blockdiag(J_ii)."""
    if attn_mask is not None or dropout_p:
        raise ValueError("the Jacobian attention supports neither attention masks nor dropout.")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    key_const, value_const = (key.detach(), value.detach()) if token_local else (key, value)
    scores = (query @ key_const.mT) * scale
    if token_local:
        scores = scores + ((query * (key - key_const)).sum(-1) * scale).diag_embed()
    if is_causal:
        if query.shape[-2] != key.shape[-2]:
            raise ValueError("the Jacobian attention needs as many queries as keys for causal attention.")
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = probs @ value_const
    if token_local:
        out = out + probs.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * (value - value_const)
    return out


class Linearisation:
    """J = ∂f/∂h at h by reverse mode only, graphs built once: Jᵀw is a backward through y = f(h), Jv one through
    g(u) = Jᵀu (Jv = ∂⟨g(u), v⟩/∂u), so no forward-mode rule is needed. The parameters' `.grad` stay untouched."""

    def __init__(self, fn: Callable[[Tensor], Tensor], h: Tensor) -> None:
        with torch.enable_grad():
            self.point = h.detach().requires_grad_(True)
            self.out = fn(self.point)
            self.dummy = torch.zeros_like(self.out, requires_grad=True)
            (self.transposed,) = torch.autograd.grad(self.out, self.point, self.dummy, create_graph=True)

    def jvp(self, v: Tensor) -> Tensor:
        (product,) = torch.autograd.grad(self.transposed, self.dummy, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.out) if product is None else product

    def gram(self, v: Tensor) -> Tensor:  # JᵀJv
        (product,) = torch.autograd.grad(self.out, self.point, self.jvp(v), retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.point) if product is None else product


def _per_row(product: MatVec, h: Tensor, rows: int) -> MatVec:
    """`product` on states shaped like `h`, as a map of `rows` flat vectors (one operator per row)."""
    return lambda v: product(v.view_as(h)).reshape(rows, -1)


@torch.no_grad()
def krylov_spectral_radius(
    matvec: MatVec, start: Tensor, steps: int = 20, restarts: int = 2, keep: int = 4
) -> tuple[Tensor, Tensor]:
    """(radius [N], residual [N]) of N D × D operators, `matvec` [N, D] → [N, D], from a random `start` [N, D]:
    Arnoldi on `steps` iterates (Gram–Schmidt twice; power iteration misses a dominant complex pair). Restarts begin at
    the sum of the `keep` largest Ritz vectors' real and imaginary parts (keeping a pair's plane, and finding a larger
    eigenvalue a run locked onto a smaller one missed). `residual` = ‖Jy − θy‖ / |θ| (‖y‖ = 1): small if converged."""
    if start.dim() != 2:
        raise ValueError(f"start must have shape [problems, dimension], got {tuple(start.shape)}.")
    if steps < 1 or restarts < 0 or keep < 1:
        raise ValueError(f"need steps ≥ 1, restarts ≥ 0 and keep ≥ 1, got {steps}, {restarts} and {keep}.")
    n, d = start.shape
    m = min(steps, d)
    rows = torch.arange(n, device=start.device)
    vector = start.double()
    failed = torch.zeros(n, dtype=torch.bool, device=start.device)
    for cycle in range(restarts + 1):
        basis, hessenberg = vector.new_zeros(n, m + 1, d), vector.new_zeros(n, m + 1, m)
        basis[:, 0] = _unit(vector)
        for j in range(m):
            w = matvec(basis[:, j].to(start.dtype)).double()
            size = w.norm(dim=-1)
            for _pass in range(2):
                coeff = torch.einsum("nkd,nd->nk", basis[:, : j + 1], w)
                w = w - torch.einsum("nk,nkd->nd", coeff, basis[:, : j + 1])
                hessenberg[:, : j + 1, j] += coeff
            beta = w.norm(dim=-1)
            alive = beta > _BREAKDOWN * size  # else: an invariant subspace (or rounding noise) — stop there
            hessenberg[:, j + 1, j] = torch.where(alive, beta, 0.0)
            basis[:, j + 1] = torch.where(alive.unsqueeze(-1), _unit(w), 0.0)
        # An overflowing operator (a blown-up state) gives non-finite entries: report nan for those problems.
        failed |= ~torch.isfinite(hessenberg).all(dim=(1, 2))
        hessenberg[failed] = 0.0
        basis[failed] = 0.0
        values, vectors = torch.linalg.eig(hessenberg[:, :m, :m])
        order = values.abs().argsort(dim=-1, descending=True)
        ritz = torch.einsum("nmk,nkd->nmd", vectors.mT, basis[:, :m].to(vectors.dtype))  # [N, m, D]
        top = order[:, 0]
        radius, leading = values.abs()[rows, top], ritz[rows, top]
        if cycle < restarts:
            wanted = ritz.gather(1, order[:, :keep, None].expand(-1, -1, d))
            vector = (wanted.real + wanted.imag).sum(dim=1)
    # Residual of the returned pair: J·y − θ·y with y complex, via J·Re(y) and J·Im(y).
    image = torch.complex(matvec(leading.real.to(start.dtype)).double(), matvec(leading.imag.to(start.dtype)).double())
    error = (image - values[rows, top].unsqueeze(-1) * leading).abs().norm(dim=-1)
    residual = error / (leading.abs().norm(dim=-1) * radius).clamp_min(1e-300)
    return radius.masked_fill(failed, math.nan), residual.masked_fill(failed, math.nan)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)


@dataclass(frozen=True)
class JacobianSpectrum:
    """The loop map's Jacobian at h_T (after `depth` iterations): radius [B, L] the per-token ρ(J_ii) (its max over
    tokens is ρ(J) of sequence b) with its Ritz residual [B, L], block_norm [B, L] ‖J_ii‖₂, map_norm [B] ‖J‖₂ per
    sequence (None if skipped), rho_A ρ(Ā) of the injection (= ρ(J) when R̄ = 0), state_norm the mean ‖h_T‖ per token."""

    depth: int
    radius: Tensor
    residual: Tensor
    block_norm: Tensor
    map_norm: Tensor | None
    rho_A: float
    state_norm: float

    def summary(self) -> dict[str, float]:
        """Scalars for logs: ρ(J) (max over tokens and sequences), medians over tokens, norms."""
        finite = bool(torch.isfinite(self.radius).all())
        rho_J = (float(self.radius.max()), float(self.radius.median())) if finite else (math.nan, math.nan)
        out = {"depth": self.depth, "rho_A": self.rho_A, "rho_J": rho_J[0], "rho_J_median": rho_J[1]}
        out.update(block_norm_max=float(self.block_norm.max()), block_norm_median=float(self.block_norm.median()))
        out.update(radius_residual_max=float(self.residual.max()), state_norm=self.state_norm)
        if self.map_norm is not None:
            out["map_norm"] = float(self.map_norm.max())
        return out


def jacobian_spectrum(
    model: Parcae,
    input_ids: Tensor,
    *,
    depth: int | None = None,
    state: Tensor | None = None,
    steps: int = 30,
    restarts: int = 1,
    norms: bool = True,
    map_norm: bool = True,
    seed: int = 0,
) -> JacobianSpectrum:
    """J = ∂F/∂h at h_T, `depth` (default μ_rec) iterations from the seeded h₀, or at `state`; `steps`/`restarts`: the
    Krylov work; `norms`/`map_norm` = False skip ‖J_ii‖₂/‖J‖₂. Eval mode, no gradients kept, global RNG untouched."""
    with evaluating(model):
        fmap = loop_map(model, input_ids)
        depth = model.config.mean_recurrence if depth is None else depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative integer, got {depth!r}.")
        h = fmap.run(depth) if state is None else state.to(fmap.inputs.drive.dtype)
        expected = (*fmap.inputs.drive.shape[:-1], model.config.d_state)
        if tuple(h.shape) != expected:
            raise ValueError(f"state must have shape {expected}, got {tuple(h.shape)}.")
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"the state after {depth} iterations is not finite, so its Jacobian is undefined.")
        batch, seq_len, width = h.shape
        tokens = batch * seq_len
        generator = torch.Generator(device=h.device).manual_seed(seed)
        local = Linearisation(_WithAttention(fmap, token_local=True), h)
        start = torch.randn(tokens, width, generator=generator, device=h.device, dtype=h.dtype)
        # The token-local map gives J_ii v_i for every token at once: one operator per row of `start`.
        radius, residual = krylov_spectral_radius(_per_row(local.jvp, h, tokens), start, steps, restarts)
        block_norm = torch.full_like(radius, float("nan"))
        if norms:
            block_norm = krylov_spectral_radius(_per_row(local.gram, h, tokens), start, steps, restarts=0)[0].sqrt()
        whole = None
        if map_norm:
            gram = _per_row(Linearisation(_WithAttention(fmap, token_local=False), h).gram, h, batch)
            seq_start = torch.randn(batch, seq_len * width, generator=generator, device=h.device, dtype=h.dtype)
            whole = krylov_spectral_radius(gram, seq_start, steps, restarts=0)[0].sqrt()
        radius, residual, block_norm = (values.view(batch, seq_len) for values in (radius, residual, block_norm))
        rho_A, state_norm = float(model.injection.spectral_radius()), float(h.float().norm(dim=-1).mean())
        return JacobianSpectrum(depth, radius, residual, block_norm, whole, rho_A, state_norm)
