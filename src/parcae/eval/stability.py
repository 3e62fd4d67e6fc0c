"""Stability diagnostics of the loop: the loop map h ↦ core(inject(h, e)) and its Jacobian spectrum.

ρ(Ā) < 1 makes the *linear* part of the update `h ← Ā·h + B̄·e + R̄(h, e)` contractive, but the loop
that runs is the full nonlinear map F(h) = core(inject(h, e)). Its local behaviour at a state h is
governed by the Jacobian J = ∂F/∂h: perturbations of h shrink under repeated application when the
spectral radius ρ(J) < 1 (near a fixed point h* = F(h*), ρ(J(h*)) < 1 is the condition for the
fixed point to attract), and one step can amplify a perturbation by up to ‖J‖₂ ≥ ρ(J).
With R̄ = 0, J = Ā, so comparing ρ(J) with ρ(Ā) shows what the nonlinear part adds.

Token structure. For one sequence, h has L tokens of S channels; every op of the core is per-token
except causal attention, so output token i depends on input tokens j ≤ i only and J (an LS × LS
matrix) is *block lower triangular* with S × S blocks J_ij = ∂F_i/∂h_j. The eigenvalues of a block
triangular matrix are those of its diagonal blocks, hence, exactly,

    ρ(J) = max_i ρ(J_ii),

and ρ_i = ρ(J_ii) is the "per-token spectral radius": the rate at which a perturbation of token i's
own state persists while the earlier tokens are held fixed. The off-diagonal blocks do not change the
spectrum but do enter the norm: ‖J‖₂ ≥ max_i ‖J_ii‖₂, and the gap measures how much a step can
amplify perturbations *across* tokens (transient, non-normal growth).

How it is computed (matrix-free). J_ii v_i for every token at once comes from one Jacobian-vector
product of a "token-local" variant of the map whose value equals F but whose attention treats the
keys and values of the *other* tokens as constants (they are detached; token i's own key and value
keep their derivative through a zero-valued term). That variant's Jacobian is exactly
blockdiag(J_11, …, J_LL), so each product applies all diagonal blocks of all sequences in parallel.
The override is installed with a `TorchFunctionMode` around `scaled_dot_product_attention`, so the
model's own blocks run unchanged. Products are taken by reverse mode only: one forward pass builds
g(u) = Jᵀu with `create_graph=True`, after which Jᵀw is one backward pass through the forward graph
and Jv = ∂⟨g(u), v⟩/∂u one backward pass through g's graph ("double-backward" JVP). On CPU this is
4–15× faster than `torch.func.jvp`, whose forward-mode rules for these ops run as Python
decompositions (≈ 1 ms per op), and it needs no forward-mode rule for the fused attention kernel.

Spectral radii come from power iteration with Krylov (Arnoldi) extraction, batched over the
independent problems: the power iterates v, Jv, J²v, … span a Krylov space whose Ritz values
approximate the largest-modulus eigenvalues. Plain power iteration (the ratio ‖J^{k+1}v‖/‖J^k v‖)
does not converge when the dominant eigenvalues are a complex-conjugate pair, which real
non-symmetric Jacobians often have; Arnoldi on the same iterates does. Explicit restarts from the
top Ritz vectors refine the estimate, and the Ritz residual is returned as a convergence check.
Norms are the square roots of the spectral radius of JᵀJ (Jv then Jᵀ·), by the same routine.
"""

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

MatVec = Callable[[Tensor], Tensor]
# A Krylov direction shorter than this fraction of the vector it came from is treated as breakdown
# (an invariant subspace was found): the matvecs run in the model's precision (fp32), so anything
# smaller is rounding noise.
_BREAKDOWN = 1e-6


# ---------------------------------------------------------------------- the loop map
@dataclass
class LoopMap:
    """The loop map F(h) = core(inject(h, e)) of `model` for fixed input ids, with its invariants.

    `e` is the (normalised) prelude output, `drive`/`shared` the injection's loop invariants
    (`Injection.prepare`), `value_embeds` the core blocks' value-embedding lookups (None for blocks
    without one) and `cos`/`sin` the RoPE tables. Calling the map runs one loop iteration on a state
    h of shape [B, L, d_state]; it is a pure function of h (gradients flow to h and the parameters).
    """

    model: Parcae
    e: Tensor
    drive: Tensor
    shared: Tensor | None
    value_embeds: tuple[Tensor | None, ...]
    cos: Tensor
    sin: Tensor

    def __call__(self, h: Tensor) -> Tensor:
        y = self.model.injection.step(h, self.drive, self.shared)
        for block, value_embed in zip(self.model.core, self.value_embeds, strict=True):
            y = block(y, self.cos, self.sin, value_embed)
        return y

    def initial_state(self, seed: int = 0) -> Tensor:
        """h₀ as the model draws it in eval (`state_init`, seeded): the state `model(ids, num_steps=T)` starts from."""
        return self.model._initial_state(self.e, seed, None)

    @torch.no_grad()
    def run(self, steps: int, h: Tensor | None = None) -> Tensor:
        """h_T after `steps` iterations from h (default: `initial_state()`), without gradient."""
        h = self.initial_state() if h is None else h
        for _ in range(steps):
            h = self(h)
        return h


def loop_map(model: Parcae, input_ids: Tensor) -> LoopMap:
    """Factor the loop out of `model.forward`: prelude once (no gradient), then a callable core step.

    Mirrors the data path of `Parcae.forward` up to the loop (embed → prelude → prelude norm →
    `injection.prepare`) by calling the model's own submodules; `tests/test_stability.py` checks that
    iterating the map reproduces the model's ‖h_T‖ and ‖h_T − h_{T−1}‖ exactly.
    """
    cfg = model.config
    if not cfg.is_looped:
        raise ValueError(f"{cfg.name} has no loop (n_core = 0), so it has no loop map.")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError("input_ids must be a [batch, seq_len] tensor of token ids.")
    if input_ids.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len {cfg.max_seq_len}.")
    with torch.no_grad():
        cos, sin = model.rotary.tables(input_ids.shape[1])
        value_embeds = {int(i): table(input_ids) for i, table in model.value_embeds.items()}
        x = model.embed(input_ids)
        for i, block in enumerate(model.prelude):
            x = block(x, cos, sin, value_embeds.get(i))
        e = model.prelude_norm(x) if model.prelude_norm is not None else x
        drive, shared = model.injection.prepare(e)
    core = tuple(value_embeds.get(cfg.n_prelude + j) for j in range(cfg.n_core))
    return LoopMap(model=model, e=e, drive=drive, shared=shared, value_embeds=core, cos=cos, sin=sin)


# ---------------------------------------------------------------------- attention override
class _AttentionOverride(TorchFunctionMode):
    """Replaces `F.scaled_dot_product_attention` by `composite_attention` (optionally token-local)."""

    def __init__(self, token_local: bool) -> None:
        super().__init__()
        self.token_local = token_local
        self.calls = 0

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
    """`scaled_dot_product_attention` written with plain ops, so every derivative (including the double
    backward the Jacobian products use) exists, whatever kernel SDPA would pick.

    `token_local=True` returns the same values but differentiates only through each query token's
    *own* key and value: the other tokens' keys and values are detached, and token i's own k_i, v_i
    re-enter through the zero-valued terms q_i·(k_i − k̂_i) and p_ii·(v_i − v̂_i) (k̂ = detached k).
    The Jacobian of the result w.r.t. the inputs is then the block diagonal of the true one.
    """
    if attn_mask is not None or dropout_p:
        raise ValueError("the Jacobian attention supports neither attention masks nor dropout.")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    key_const, value_const = (key.detach(), value.detach()) if token_local else (key, value)
    scores = (query @ key_const.mT) * scale
    if token_local:
        own = ((query * (key - key_const)).sum(-1) * scale).diag_embed()
        scores = scores + own
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


def _with_attention(fmap: LoopMap, token_local: bool) -> Callable[[Tensor], Tensor]:
    """The map with composite (optionally token-local) attention; checks every core block used it."""
    expected = len(fmap.model.core)

    def mapped(h: Tensor) -> Tensor:
        mode = _AttentionOverride(token_local)
        with mode:
            out = fmap(h)
        if mode.calls != expected:
            raise RuntimeError(
                f"the core made {mode.calls} scaled_dot_product_attention calls for {expected} blocks; the "
                "Jacobian needs every cross-token interaction to go through that function."
            )
        return out

    return mapped


class Linearisation:
    """J = ∂f/∂h at one point h, as products Jv and Jᵀw from reverse mode only (graphs kept, reused).

    One forward pass builds y = f(h) and g(u) = Jᵀu with `create_graph=True` (g is linear in the
    dummy u); then `vjp(w)` = Jᵀw is a backward pass through y's graph and `jvp(v)` = Jv = ∂⟨g(u), v⟩/∂u
    a backward pass through g's graph. `autograd.grad` never touches the parameters' `.grad`.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], h: Tensor) -> None:
        with torch.enable_grad():
            self.point = h.detach().requires_grad_(True)
            self.out = fn(self.point)
            self.dummy = torch.zeros_like(self.out, requires_grad=True)
            (self.transposed,) = torch.autograd.grad(self.out, self.point, self.dummy, create_graph=True)

    def jvp(self, v: Tensor) -> Tensor:
        (product,) = torch.autograd.grad(self.transposed, self.dummy, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.out) if product is None else product

    def vjp(self, w: Tensor) -> Tensor:
        (product,) = torch.autograd.grad(self.out, self.point, w, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.point) if product is None else product


# ---------------------------------------------------------------------- Krylov estimates
@torch.no_grad()
def krylov_spectral_radius(
    matvec: MatVec, start: Tensor, steps: int = 20, restarts: int = 2, keep: int = 4
) -> tuple[Tensor, Tensor]:
    """Spectral radius of N independent D × D linear operators, batched: (radius [N], residual [N]).

    `matvec` maps a batch of vectors [N, D] to [N, D] (row n through operator n); `start` [N, D] is
    the initial vector (it should have a component along the dominant eigenvectors: use a random one).
    Arnoldi on the power iterates (`steps` matvecs, classical Gram–Schmidt applied twice), restarted
    `restarts` times from the sum of the `keep` largest-modulus Ritz vectors (real and imaginary parts,
    so a complex pair's invariant plane is kept; several of them, so that a run that has locked onto
    a slightly smaller eigenvalue can still find a close larger one). `residual` is the relative
    residual ‖Jy − θy‖ / |θ| (‖y‖ = 1) of the returned Ritz pair, computed with two extra matvecs:
    small means converged. The Krylov basis and the small eigenproblems are float64; matvecs run in
    `start`'s dtype.
    """
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
        basis = vector.new_zeros(n, m + 1, d)
        hessenberg = vector.new_zeros(n, m + 1, m)
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
    theta = values[rows, top]
    image = torch.complex(matvec(leading.real.to(start.dtype)).double(), matvec(leading.imag.to(start.dtype)).double())
    residual = (image - theta.unsqueeze(-1) * leading).abs().norm(dim=-1) / (
        leading.abs().norm(dim=-1) * radius
    ).clamp_min(1e-300)
    nan = torch.tensor(float("nan"), dtype=radius.dtype, device=radius.device)
    return torch.where(failed, nan, radius), torch.where(failed, nan, residual)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)


# ---------------------------------------------------------------------- the Jacobian spectrum
@dataclass(frozen=True)
class JacobianSpectrum:
    """Spectrum of the loop map's Jacobian at the state h_T reached after `depth` iterations.

    radius [B, L]: per-token ρ(J_ii); the full map's ρ(J) for sequence b is `radius[b].max()`.
    residual [B, L]: relative Ritz residual of each radius estimate (convergence check).
    block_norm [B, L]: ‖J_ii‖₂. map_norm [B]: ‖J‖₂ of each sequence's whole map (None if skipped).
    rho_A: ρ(Ā) of the injection, for comparison (= ρ(J) when R̄ = 0).
    state_norm: mean ‖h_T‖ per token at the evaluated state.
    """

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
        out = {
            "depth": self.depth,
            "rho_A": self.rho_A,
            "rho_J": float(self.radius.max()) if finite else float("nan"),
            "rho_J_median": float(self.radius.median()) if finite else float("nan"),
            "block_norm_max": float(self.block_norm.max()),
            "block_norm_median": float(self.block_norm.median()),
            "radius_residual_max": float(self.residual.max()),
            "state_norm": self.state_norm,
        }
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
    """Spectrum of J = ∂F/∂h of the loop map at h_T, T = `depth` (default μ_rec) iterations from h₀.

    h₀ is the model's eval-mode initial state (seed `seed`), or pass `state` to evaluate at any h.
    `steps`/`restarts` set the Krylov work (per estimate: (restarts + 1) · steps + 2 products Jv, each
    about one backward pass); `norms=False` skips ‖J_ii‖₂ and `map_norm=False` the whole-map ‖J‖₂
    (each adds `steps` products JᵀJv and one forward pass). The model is put in eval mode for the computation and
    restored; no gradients are accumulated and the global RNG is not consumed.
    """
    was_training = model.training
    model.eval()
    try:
        fmap = loop_map(model, input_ids)
        depth = model.config.mean_recurrence if depth is None else depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative integer, got {depth!r}.")
        h = fmap.run(depth) if state is None else state.to(fmap.drive.dtype)
        expected = (*fmap.drive.shape[:-1], model.config.d_state)
        if tuple(h.shape) != expected:
            raise ValueError(f"state must have shape {expected}, got {tuple(h.shape)}.")
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"the state after {depth} iterations is not finite, so its Jacobian is undefined.")
        batch, seq_len, width = h.shape
        generator = torch.Generator(device=h.device).manual_seed(seed)
        local = Linearisation(_with_attention(fmap, token_local=True), h)

        def blocks(v: Tensor) -> Tensor:  # [B·L, S] → J_ii v_i for every token
            return local.jvp(v.view_as(h)).reshape(batch * seq_len, width)

        def block_gram(v: Tensor) -> Tensor:  # J_iiᵀ J_ii v_i
            return local.vjp(local.jvp(v.view_as(h))).reshape(batch * seq_len, width)

        start = torch.randn(batch * seq_len, width, generator=generator, device=h.device, dtype=h.dtype)
        radius, residual = krylov_spectral_radius(blocks, start, steps, restarts)
        block_norm = torch.full_like(radius, float("nan"))
        if norms:
            block_norm = krylov_spectral_radius(block_gram, start, steps, restarts=0)[0].sqrt()
        whole = None
        if map_norm:
            full = Linearisation(_with_attention(fmap, token_local=False), h)

            def gram(v: Tensor) -> Tensor:  # JᵀJ v for each sequence's whole map
                return full.vjp(full.jvp(v.view_as(h))).reshape(batch, seq_len * width)

            seq_start = torch.randn(batch, seq_len * width, generator=generator, device=h.device, dtype=h.dtype)
            whole = krylov_spectral_radius(gram, seq_start, steps, restarts=0)[0].sqrt()
        return JacobianSpectrum(
            depth=depth,
            radius=radius.view(batch, seq_len),
            residual=residual.view(batch, seq_len),
            block_norm=block_norm.view(batch, seq_len),
            map_norm=whole,
            rho_A=float(model.injection.spectral_radius()),
            state_norm=float(h.float().norm(dim=-1).mean()),
        )
    finally:
        model.train(was_training)
