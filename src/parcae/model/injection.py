"""Input injection `Ā·h + B̄·e` of one loop step (paper §3, Table 1): diagonal (Euler or exact ZOH), linear, additive."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Initial per-channel decay exp(−Δ·a) = √(1/5), the official init (docs/official-format.md, Initialization).
INITIAL_DECAY = math.sqrt(1.0 / 5.0)


def inverse_softplus(y: float) -> float:
    """x such that softplus(x) = y, for y > 0 (stable for small y)."""
    return y + math.log(-math.expm1(-y))


class Injection(nn.Module):
    """Interface: `prepare(e)` gives the loop invariants for the prelude output e [B, L, C]: the per-row *drive* B̄·e
    [B, L, S] (sliceable by active rows) and a *shared* state operator; `step` Ā·h + B̄·e for the rows of h (drive
    sliced alike) each iteration; `spectral_radius` ρ(Ā) (float64, detached)."""

    def prepare(self, e: Tensor) -> tuple[Tensor, Tensor | None]: ...
    def step(self, h: Tensor, drive: Tensor, shared: Tensor | None) -> Tensor: ...
    def spectral_radius(self) -> Tensor: ...

    def reset_parameters(self, std: float) -> None:
        """Paper init; `std` is the model's base σ."""


class DiagonalInjection(Injection):
    """Parcae's negative-diagonal A (paper Eq. 3): Ā = exp(−Δ⊙a) (ρ < 1), a = exp(A_log), Δ = softplus(dt_bias);
    B̄·e = Δ ⊙ (B e) (Euler) or (1 − e^{−Δa})/a ⊙ (B e) (`diagonal-zoh`: exact ZOH); B unconstrained."""

    def __init__(self, d_state: int, d_model: int, exact_zoh: bool = False) -> None:
        super().__init__()
        self.exact_zoh = exact_zoh
        self.A_log = nn.Parameter(torch.empty(d_state))
        self.dt_bias = nn.Parameter(torch.empty(d_state))
        self.B = nn.Parameter(torch.empty(d_state, d_model))

    def rates(self) -> tuple[Tensor, Tensor]:
        """(Δ, a): step sizes and continuous decay rates, both > 0."""
        return F.softplus(self.dt_bias), torch.exp(self.A_log)

    def gain(self) -> Tensor:
        """Per-channel input gain: Δ (Euler) or (1 − e^{−Δa})/a (exact ZOH, via expm1 for stability)."""
        dt, a = self.rates()
        return -torch.expm1(-dt * a) / a if self.exact_zoh else dt

    def decay(self) -> Tensor:
        dt, a = self.rates()
        return torch.exp(-dt * a)

    def prepare(self, e: Tensor) -> tuple[Tensor, Tensor | None]:
        drive = F.linear(e, self.B) * self.gain().to(e.dtype)
        return drive, self.decay().to(e.dtype)

    def step(self, h: Tensor, drive: Tensor, shared: Tensor | None) -> Tensor:
        return torch.addcmul(drive, h, shared)

    def spectral_radius(self) -> Tensor:
        # float64: exp(−Δa) rounds to exactly 1.0 in fp32 once Δa < 6e-8.
        dt = F.softplus(self.dt_bias.detach().double())
        return torch.exp(-dt * torch.exp(self.A_log.detach().double())).max()

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        self.A_log.zero_()
        self.dt_bias.fill_(inverse_softplus(-math.log(INITIAL_DECAY)))
        if self.B.shape[0] == self.B.shape[1]:
            nn.init.eye_(self.B)
        elif not self.B.is_meta:
            nn.init.orthogonal_(self.B)


class LinearInjection(Injection):
    """Concat-projection (Huginn / RDM adapter) W·[h; e], W = [W_h | W_e] [S, S + C]: Ā = W_h (ρ unconstrained)."""

    def __init__(self, d_state: int, d_model: int) -> None:
        super().__init__()
        self.d_state = d_state
        self.weight = nn.Parameter(torch.empty(d_state, d_state + d_model))
        self._rho_cache: tuple[tuple[int, int, torch.device], Tensor] | None = None

    def prepare(self, e: Tensor) -> tuple[Tensor, Tensor | None]:
        state_block, input_block = self.weight.split([self.d_state, self.weight.shape[1] - self.d_state], 1)
        return F.linear(e, input_block), state_block

    def step(self, h: Tensor, drive: Tensor, shared: Tensor | None) -> Tensor:
        return torch.addmm(drive.flatten(0, -2), h.flatten(0, -2), shared.t()).view_as(drive)

    def spectral_radius(self) -> Tensor:
        # The eigen-decomposition costs O(S³); recompute only when the weight has changed.
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if self._rho_cache is None or self._rho_cache[0] != key:
            state_block = self.weight.detach()[:, : self.d_state].double().cpu()
            self._rho_cache = (key, torch.linalg.eigvals(state_block).abs().max())
        return self._rho_cache[1]

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        nn.init.trunc_normal_(self.weight, std=std, a=-3 * std, b=3 * std)
        self._rho_cache = None


class AdditiveInjection(Injection):
    """h + e: Ā = I, marginally stable (the additive RDM baseline). No parameters."""

    def prepare(self, e: Tensor) -> tuple[Tensor, Tensor | None]:
        return e, None

    def step(self, h: Tensor, drive: Tensor, shared: Tensor | None) -> Tensor:
        return h + drive

    def spectral_radius(self) -> Tensor:
        return torch.tensor(1.0, dtype=torch.float64)


def build_injection(kind: str, d_state: int, d_model: int) -> Injection:
    if kind in ("diagonal", "diagonal-zoh"):
        return DiagonalInjection(d_state, d_model, exact_zoh=kind == "diagonal-zoh")
    if kind == "linear":
        return LinearInjection(d_state, d_model)
    if kind == "add":
        return AdditiveInjection()
    raise ValueError(f"Unknown injection {kind!r}.")
