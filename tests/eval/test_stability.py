"""The loop map and its Jacobian spectrum: matrix-free estimates against dense Jacobians on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parcae import Parcae, ParcaeConfig
from parcae.eval.stability import composite_attention, jacobian_spectrum, krylov_spectral_radius, loop_map

INJECTIONS = {
    "diagonal": dict(injection="diagonal"),
    "diagonal-zoh": dict(injection="diagonal-zoh"),
    "linear": dict(injection="linear", prelude_norm=False),
    "add": dict(injection="add", prelude_norm=False),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> ParcaeConfig:
    # Two core blocks (cross-token paths through two attentions), GQA, a core value embedding (layer 1).
    base = dict(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, d_mlp=64, n_prelude=1, n_core=2, n_coda=1,
                max_seq_len=16, mean_recurrence=3, name="jacobian-tiny")  # fmt: skip
    return ParcaeConfig(**{**base, **overrides})


def nonlinear(model: Parcae) -> Parcae:
    """Give the zero-initialised output projections real weights, so R̄ ≠ 0 and tokens interact."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "out_proj" in name or "down_proj" in name:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    return model.eval()


def dense_jacobian(model: Parcae, ids: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(J over the whole batch [B·L·S, B·L·S] in float64, the state h_T it was taken at)."""
    fmap = loop_map(model, ids)
    h = fmap.run(depth)
    shape = h.shape
    jac = torch.autograd.functional.jacobian(lambda x: fmap(x.view(shape)).reshape(-1), h.reshape(-1), vectorize=True)
    return jac.double(), h


def blocks(jac: torch.Tensor, count: int, size: int) -> torch.Tensor:
    """[count, count, size, size] view of a square matrix cut into size × size blocks."""
    return jac.view(count, size, count, size).transpose(1, 2)


@pytest.mark.parametrize("overrides", INJECTIONS.values(), ids=list(INJECTIONS))
def test_loop_map_reproduces_the_models_loop(overrides: dict) -> None:
    model = nonlinear(Parcae(tiny(**overrides)))
    ids = torch.randint(0, 64, (2, 7))
    out = model(ids, num_steps=3)
    fmap = loop_map(model, ids)
    before = fmap.run(2)
    after = fmap(before).detach()
    torch.testing.assert_close(after.norm(dim=-1).mean(), out.metrics["state_norm"].float())
    torch.testing.assert_close((after - before).norm(dim=-1).mean(), out.metrics["recurrent_residual"].float())


@pytest.mark.parametrize("overrides", [INJECTIONS["diagonal"], INJECTIONS["linear"], INJECTIONS["add"]],
                         ids=["diagonal", "linear", "add"])  # fmt: skip
def test_matrix_free_spectrum_matches_the_dense_jacobian(overrides: dict) -> None:
    model = nonlinear(Parcae(tiny(**overrides)))
    batch, seq_len, width = 2, 5, model.config.d_state
    ids = torch.randint(0, 64, (batch, seq_len))
    jac, _ = dense_jacobian(model, ids, depth=3)
    tokens = blocks(jac, batch * seq_len, width)  # [(b, i), (c, j)] blocks
    # Rows are independent and attention is causal: J is block lower triangular over (row, token).
    for a in range(batch * seq_len):
        for b in range(batch * seq_len):
            same_row_past = a // seq_len == b // seq_len and b <= a
            if not same_row_past:
                assert tokens[a, b].abs().max() == 0, (a, b)
    assert tokens[seq_len - 1, 0].abs().max() > 0  # …and tokens do interact
    diagonal = tokens[range(batch * seq_len), range(batch * seq_len)]  # [B·L, S, S]
    per_token = torch.linalg.eigvals(diagonal).abs().amax(-1).view(batch, seq_len)
    sequence = jac.view(batch, seq_len * width, batch, seq_len * width)[range(batch), :, range(batch)]
    # The documented identity: the whole map's spectral radius is the largest per-token one.
    torch.testing.assert_close(torch.linalg.eigvals(sequence).abs().amax(-1), per_token.amax(-1))

    # A full Krylov space (steps = S) makes Arnoldi exact up to rounding.
    spectrum = jacobian_spectrum(model, ids, depth=3, steps=width, restarts=0)
    torch.testing.assert_close(spectrum.radius, per_token, rtol=1e-4, atol=1e-6)
    assert spectrum.residual.max() < 1e-4
    torch.testing.assert_close(spectrum.block_norm, torch.linalg.matrix_norm(diagonal, 2).view(batch, seq_len),
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(spectrum.map_norm, torch.linalg.matrix_norm(sequence, 2), rtol=1e-4, atol=1e-6)
    summary = spectrum.summary()
    assert summary["rho_J"] == pytest.approx(float(per_token.max()), rel=1e-4)
    assert summary["rho_A"] == pytest.approx(float(model.injection.spectral_radius()))


@pytest.mark.parametrize("overrides", [INJECTIONS["diagonal"], INJECTIONS["linear"], INJECTIONS["add"]],
                         ids=["diagonal", "linear", "add"])  # fmt: skip
def test_at_initialisation_the_jacobian_is_the_state_matrix(overrides: dict) -> None:
    # The paper's init zeroes the blocks' output projections, so R̄ = 0 and J_ii = Ā for every token.
    model = Parcae(tiny(**overrides)).eval()
    ids = torch.randint(0, 64, (2, 6))
    spectrum = jacobian_spectrum(model, ids, steps=model.config.d_state, restarts=0, norms=False, map_norm=False)
    rho_a = float(model.injection.spectral_radius())
    torch.testing.assert_close(spectrum.radius, torch.full_like(spectrum.radius, rho_a), rtol=1e-5, atol=1e-6)


def test_krylov_converges_on_a_dominant_complex_pair() -> None:
    # Plain power iteration never settles here (the dominant eigenvalues are 0.9·e^{±0.7i});
    # restarted Arnoldi with fewer steps than the dimension still finds |λ| = 0.9.
    generator = torch.Generator().manual_seed(3)
    count, dim = 6, 40
    rest = torch.rand(count, dim - 2, generator=generator, dtype=torch.float64) * 1.2 - 0.6
    core = torch.diag_embed(torch.cat([torch.zeros(count, 2, dtype=torch.float64), rest], dim=1))
    angle = torch.tensor(0.7, dtype=torch.float64)
    core[:, :2, :2] = 0.9 * torch.stack(
        [torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])]
    )
    basis = torch.randn(count, dim, dim, generator=generator, dtype=torch.float64)
    matrices = basis @ core @ torch.linalg.inv(basis)
    start = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    radius, residual = krylov_spectral_radius(lambda v: (matrices @ v.unsqueeze(-1)).squeeze(-1), start, 12, 4)
    torch.testing.assert_close(radius, torch.full((count,), 0.9, dtype=torch.float64), rtol=1e-6, atol=0)
    assert residual.max() < 1e-5


def test_krylov_marks_an_overflowing_operator_as_nan() -> None:
    def matvec(v: torch.Tensor) -> torch.Tensor:
        out = 2.0 * v
        out[0] = float("inf")
        return out

    radius, _ = krylov_spectral_radius(matvec, torch.ones(2, 5), steps=3, restarts=1)
    assert torch.isnan(radius[0]) and radius[1].item() == pytest.approx(2.0)


def test_token_local_attention_has_the_values_of_sdpa() -> None:
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for token_local in (False, True):
        got = composite_attention(q, k, v, is_causal=True, enable_gqa=True, token_local=token_local)
        torch.testing.assert_close(got, expected)


def test_attention_outside_sdpa_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # If the core mixed tokens some other way, the token-local trick would silently be wrong.
    model = nonlinear(Parcae(tiny()))
    attention = model.core[0].attn
    monkeypatch.setattr(attention, "forward", lambda x, *args, **kwargs: x.cumsum(1))
    with pytest.raises(RuntimeError, match="scaled_dot_product_attention"):
        jacobian_spectrum(model, torch.randint(0, 64, (1, 4)), steps=4, restarts=0)


def test_bad_inputs_give_clear_errors() -> None:
    model = nonlinear(Parcae(tiny()))
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match="not finite"):
        jacobian_spectrum(model, ids, state=torch.full((1, 4, 32), float("inf")))
    with pytest.raises(ValueError, match="shape"):
        jacobian_spectrum(model, ids, state=torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match="no loop"):
        loop_map(Parcae(tiny(n_core=0)), ids)
    assert model.training is False  # the caller's mode is restored
