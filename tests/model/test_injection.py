import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parcae.model.injection import (
    INITIAL_DECAY,
    AdditiveInjection,
    DiagonalInjection,
    LinearInjection,
    inverse_softplus,
)

floats = st.floats(min_value=-12.0, max_value=12.0, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(a_log=st.lists(floats, min_size=1, max_size=16), dt_bias=st.lists(floats, min_size=1, max_size=16))
def test_diagonal_spectral_radius_below_one_for_any_parameters(a_log, dt_bias) -> None:
    width = min(len(a_log), len(dt_bias))
    inj = DiagonalInjection(width, 4)
    with torch.no_grad():
        inj.A_log.copy_(torch.tensor(a_log[:width]))
        inj.dt_bias.copy_(torch.tensor(dt_bias[:width]))
    rho = inj.spectral_radius()
    assert 0 <= rho < 1
    # The decay used by the loop (fp32) lies in [0, 1]: fp32 rounds exp(−Δa) to 1 once Δa < 6e-8,
    # which is why ρ is reported in float64.
    assert bool((inj.decay() <= 1).all()) and bool((inj.decay() >= 0).all())


def test_linear_spectral_radius_is_that_of_the_state_block() -> None:
    inj = LinearInjection(6, 4)
    inj.reset_parameters(0.3)
    expected = torch.linalg.eigvals(inj.weight.detach()[:, :6].double()).abs().max()
    torch.testing.assert_close(inj.spectral_radius(), expected)
    with torch.no_grad():
        inj.weight[:, :6] = 2 * torch.eye(6)  # in-place update: the cached value must refresh
    torch.testing.assert_close(inj.spectral_radius(), torch.tensor(2.0, dtype=torch.float64))
    assert AdditiveInjection().spectral_radius() == 1


def test_linear_injection_is_concat_projection() -> None:
    inj = LinearInjection(6, 4)
    inj.reset_parameters(0.3)
    h, e = torch.randn(2, 3, 6), torch.randn(2, 3, 4)
    drive, shared = inj.prepare(e)
    torch.testing.assert_close(inj.step(h, drive, shared), torch.cat([h, e], -1) @ inj.weight.detach().T)


def test_zoh_gain_equals_the_held_input_integral() -> None:
    """(1 − e^{−Δa})/a = ∫₀^Δ e^{−aτ} dτ, checked by numerical quadrature in float64."""
    inj = DiagonalInjection(5, 5, exact_zoh=True)
    with torch.no_grad():
        inj.A_log.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5]))
        inj.dt_bias.copy_(torch.tensor([-2.0, 0.5, 0.0, 1.5, -0.5]))
    dt, a = (t.detach().double() for t in inj.rates())
    tau = torch.linspace(0, 1, 20001, dtype=torch.float64)[:, None] * dt
    integral = torch.trapezoid(torch.exp(-a * tau), tau, dim=0)
    torch.testing.assert_close(inj.gain().detach().double(), integral, atol=1e-7, rtol=1e-6)
    euler = DiagonalInjection(5, 5)
    euler.load_state_dict(inj.state_dict())
    assert bool((inj.gain() <= euler.gain()).all())  # 0 < g_zoh ≤ Δ


def test_zoh_gain_is_stable_for_tiny_rates() -> None:
    inj = DiagonalInjection(1, 1, exact_zoh=True)
    with torch.no_grad():
        inj.A_log.fill_(-30.0)  # a ≈ 1e-13: the naive (1 − e^{−Δa})/a cancels to 0 in fp32
        inj.dt_bias.fill_(0.0)
    torch.testing.assert_close(inj.gain(), torch.nn.functional.softplus(inj.dt_bias), rtol=1e-5, atol=0)


def test_initial_decay() -> None:
    inj = DiagonalInjection(4, 4)
    inj.reset_parameters(0.1)
    torch.testing.assert_close(inj.decay(), torch.full((4,), math.sqrt(0.2)))
    assert abs(INITIAL_DECAY - 0.4472) < 1e-4
    assert abs(torch.nn.functional.softplus(torch.tensor(inverse_softplus(0.8047))).item() - 0.8047) < 1e-6
