import pytest
import torch
from torch import nn

import reference
from parcae import DepthPlan, Parcae, ParcaeConfig, get_preset
from parcae.model.injection import INITIAL_DECAY


def small(**overrides) -> ParcaeConfig:
    base = dict(
        vocab_size=96, d_model=64, n_heads=2, d_mlp=128, n_prelude=1, n_core=2, n_coda=1,
        max_seq_len=32, mean_recurrence=4, name="test-small",
    )  # fmt: skip
    return ParcaeConfig(**{**base, **overrides})


def randomise(model: Parcae, scale: float = 0.3) -> Parcae:
    """Replace the zero output projections and identity B with random values, so every path matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "out_proj" in name or "down_proj" in name or name.endswith("injection.B"):
                p.normal_(0, scale / p.shape[-1] ** 0.5)
    return model


def ids(batch: int = 3, seq_len: int = 12, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len))


VARIANTS = {
    "diagonal": dict(),
    "diagonal-zoh": dict(injection="diagonal-zoh"),
    "linear": dict(injection="linear", prelude_norm=False),
    "add": dict(injection="add", prelude_norm=False),
    "swiglu-gqa": dict(mlp="swiglu", n_heads=4, n_kv_heads=2),
    "wide-state": dict(d_state=128),
    "no-ve-no-qknorm": dict(value_embeddings=False, qk_norm=False, tie_embeddings=False),
    "transformer": dict(n_core=0, n_prelude=2, n_coda=1),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=list(VARIANTS))
def test_shapes_and_metrics(overrides: dict) -> None:
    cfg = small(**overrides)
    model = Parcae(cfg).eval()
    x = ids()
    out = model(x, labels=x)
    assert out.logits.shape == (3, 12, cfg.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    if cfg.is_looped:
        for key in (
            "rho_A",
            "state_norm",
            "recurrent_residual",
            "sampled_core_passes",
            "executed_core_passes",
        ):
            assert key in out.metrics
        assert out.metrics["sampled_core_passes"] == 3 * cfg.mean_recurrence


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=list(VARIANTS))
def test_matches_naive_reference_in_eval(overrides: dict) -> None:
    """The whole forward against tests/reference.py (explicit attention, complex RoPE, masked loop)."""
    model = randomise(Parcae(small(**overrides))).eval()
    x = ids()
    out = model(x, num_steps=3, state_seed=7)
    h0 = None
    if model.config.is_looped:
        e_shape = (*x.shape, model.config.d_state)
        h0 = model.initial_state(torch.empty(*x.shape, model.config.d_model), 7, None)
        assert h0.shape == e_shape
    expected, _ = reference.forward(model, x, DepthPlan.fixed(3, 3, 3), h0)
    torch.testing.assert_close(out.logits, expected, atol=2e-4, rtol=2e-4)


def test_causality() -> None:
    model = randomise(Parcae(small())).eval()
    x = ids(2, 16)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 5) % 96
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_eval_is_deterministic_and_never_samples() -> None:
    model = randomise(Parcae(small(mean_recurrence=6))).eval()
    x = ids()
    first, second = model(x), model(x)
    torch.testing.assert_close(first.logits, second.logits, atol=0, rtol=0)
    assert first.metrics["mean_depth"] == 6
    other_seed = model(x, state_seed=123)
    assert not torch.equal(first.logits, other_seed.logits)  # h₀ matters, and the seed controls it
    model.train()  # the same call in training mode does sample depths
    assert len({model(x, step=s).metrics["mean_depth"] for s in range(6)}) > 1


def test_training_depths_reproducible_from_step() -> None:
    model = Parcae(small(mean_recurrence=8)).train()
    x = ids(16)
    a = model(x, step=5).metrics["sampled_core_passes"]
    assert model(x, step=5).metrics["sampled_core_passes"] == a
    assert {model(x, step=s).metrics["sampled_core_passes"] for s in range(6, 12)} != {a}


def test_compaction_executes_only_sampled_passes_at_batch_32() -> None:
    """Issue requirement: micro-batch 32, μ_rec 8 → executed / sampled ≤ 1.05 (we get exactly 1)."""
    model = Parcae(small(mean_recurrence=8, n_core=1, d_mlp=64)).train()
    x = ids(32, 8)
    ratios = []
    for step in range(5):
        metrics = model(x, labels=x, step=step).metrics
        ratios.append(metrics["executed_core_passes"] / metrics["sampled_core_passes"])
    assert max(ratios) <= 1.05


PLANS = {
    "canonical": lambda b, length: DepthPlan.from_depths(torch.tensor([5, 1, 3, 8, 2])[:b], 3),
    "unsorted-phases": lambda b, length: DepthPlan(torch.tensor([0, 4, 2, 1, 3]), torch.tensor([3, 1, 2, 2, 0])),
    "per-token": lambda b, length: DepthPlan.from_depths(torch.randint(1, 7, (b, length)), 2),
}


@pytest.mark.parametrize("make_plan", PLANS.values(), ids=list(PLANS))
def test_compacted_loop_equals_masked_reference(make_plan) -> None:
    """Outputs and gradients of the compacted loop equal the official-style masked loop."""
    torch.manual_seed(1)
    model = randomise(Parcae(small(max_seq_len=16))).train()
    x = ids(5, 10)
    plan = make_plan(5, 10)
    out = model(x, labels=x, depth_plan=plan, state_seed=3)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    h0 = model.initial_state(torch.empty(5, 10, 64), 3, None)
    logits, loss = reference.forward(model, x, plan, h0, labels=x)
    loss.backward()
    torch.testing.assert_close(out.logits, logits, atol=2e-4, rtol=2e-4)
    assert set(ours) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=2e-4, rtol=2e-3, msg=name)
    if not plan.per_token:
        assert out.metrics["executed_core_passes"] == out.metrics["sampled_core_passes"] == int(plan.total.sum())


def test_truncated_backprop_stops_gradient_at_the_no_grad_steps() -> None:
    """Gradients equal an explicit no_grad-then-grad reference and differ from full backprop."""
    torch.manual_seed(2)
    model = randomise(Parcae(small())).train()
    x = ids(4, 8)
    plan = DepthPlan.fixed(4, 6, 2)

    def grads(run) -> dict[str, torch.Tensor]:
        model.zero_grad()
        run().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    h0 = model.initial_state(torch.empty(4, 8, 64), 0, None)
    ours = grads(lambda: model(x, labels=x, depth_plan=plan, state_seed=0).loss)
    truncated = grads(lambda: reference.forward(model, x, plan, h0, labels=x)[1])
    full = grads(lambda: reference.forward(model, x, plan, h0, labels=x, truncate=False)[1])
    for name in ours:
        torch.testing.assert_close(ours[name], truncated[name], atol=2e-4, rtol=2e-3, msg=name)
    assert not torch.allclose(ours["injection.A_log"], full["injection.A_log"], atol=1e-6)


def test_every_parameter_gets_a_gradient_every_step() -> None:
    model = Parcae(small()).train()
    x = ids(8, 8)
    model(x, labels=x, step=0).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_transformer_equals_plain_blocks() -> None:
    """n_core = 0 is exactly embed → blocks → norm → head (no loop, no injection, no C)."""
    cfg = small(n_core=0, n_prelude=2, n_coda=2)
    model = randomise(Parcae(cfg)).eval()
    assert not hasattr(model, "injection") and not hasattr(model, "readout")
    x = ids()
    expected, _ = reference.forward(model, x, None, None)
    torch.testing.assert_close(model(x).logits, expected, atol=2e-4, rtol=2e-4)
    assert model(x).metrics == {}


def test_chunked_loss_equals_full_loss(monkeypatch) -> None:
    model = randomise(Parcae(small())).train()
    x = ids(4, 12)
    labels = x.clone()
    labels[:, :3] = -100
    full = model(x, labels=labels, num_steps=3, state_seed=1)
    full.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr("parcae.model.head.CHUNK_ELEMENTS", 96 * 7)
    chunked = model(x, labels=labels, num_steps=3, state_seed=1, return_logits=False)
    chunked.loss.backward()
    assert chunked.logits is None
    torch.testing.assert_close(chunked.loss, full.loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_paper_init() -> None:
    cfg = small(d_model=128, n_heads=2, d_mlp=512)
    model = Parcae(cfg)
    sigma = (2 / (5 * 128)) ** 0.5
    assert torch.count_nonzero(model.core[0].attn.out_proj.weight) == 0
    assert torch.count_nonzero(model.prelude[0].mlp.down_proj.weight) == 0
    torch.testing.assert_close(model.injection.decay(), torch.full((128,), INITIAL_DECAY))
    torch.testing.assert_close(model.injection.B.detach(), torch.eye(128))
    assert model.injection.A_log.abs().max() == 0
    for weight in (model.core[0].attn.q_proj.weight, model.readout.weight, model.core[0].mlp.up_proj.weight):
        singular = torch.linalg.svdvals(weight.detach())
        torch.testing.assert_close(singular, torch.full_like(singular, sigma * max(weight.shape) ** 0.5))
    assert abs(model.embed.weight.std().item() - sigma) < 0.2 * sigma
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("state_init", ["like-init", "normal", "zero"])
def test_state_init(state_init: str) -> None:
    model = Parcae(small(state_init=state_init)).eval()
    h = model.initial_state(torch.empty(4, 32, 64), 0, None)
    sigma = model.config.init_std
    if state_init == "zero":
        assert torch.count_nonzero(h) == 0
    else:
        assert abs(h.std().item() - sigma) < 0.15 * sigma
    if state_init == "like-init":
        assert h.abs().max() <= 3 * sigma


def test_save_load_roundtrip(tmp_path) -> None:
    model = randomise(Parcae(small())).eval()
    model.save_pretrained(tmp_path)
    loaded = Parcae.from_pretrained(tmp_path).eval()
    x = ids()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    assert loaded.lm_head.weight is loaded.embed.weight
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # the tied head is stored once


def test_untied_roundtrip(tmp_path) -> None:
    model = Parcae(get_preset("gpt-tiny")).eval()
    model.save_pretrained(tmp_path)
    loaded = Parcae.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.lm_head.weight is not loaded.embed.weight


def test_strict_loading_names_the_keys(tmp_path) -> None:
    model = Parcae(small())
    state = dict(model.state_dict())
    fresh = Parcae(small())
    with pytest.raises(ValueError, match=r"missing readout\.weight"):
        fresh.load_weights({k: v for k, v in state.items() if k != "readout.weight"})
    with pytest.raises(ValueError, match="unexpected freqs_cis"):
        fresh.load_weights({**state, "freqs_cis": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"wrong shape injection\.B"):
        fresh.load_weights({**state, "injection.B": torch.zeros(3, 3)})
    model.save_pretrained(tmp_path)
    small(d_mlp=256).save(tmp_path / "config.json")  # a config that does not match the weights
    with pytest.raises(ValueError, match="wrong shape"):
        Parcae.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        Parcae.from_pretrained(tmp_path / "nowhere")


def test_corrupt_weights_file(tmp_path) -> None:
    Parcae(small()).save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        Parcae.from_pretrained(tmp_path)


BAD_INPUTS = {
    "must lie in \\[0, 96\\)": lambda: (torch.tensor([[1, 96]]), None, {}),
    "must lie in \\[0, 96\\), got ids in \\[-1": lambda: (torch.tensor([[-1, 3]]), None, {}),
    "exceeds max_seq_len 32": lambda: (torch.zeros(1, 33, dtype=torch.long), None, {}),
    "integer token ids": lambda: (torch.zeros(1, 4), None, {}),
    "\\[batch, seq_len\\] tensor": lambda: (torch.zeros(4, dtype=torch.long), None, {}),
    "is empty": lambda: (torch.zeros(1, 0, dtype=torch.long), None, {}),
    "labels must have the shape": lambda: (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3), {}),
    "labels must lie in": lambda: (torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), 200), {}),
    "num_steps must be a positive integer": lambda: (torch.zeros(1, 4, dtype=torch.long), None, {"num_steps": 0}),
    "depth plan shapes": lambda: (
        torch.zeros(2, 4, dtype=torch.long), None, {"depth_plan": DepthPlan.fixed(3, 2, 1)},
    ),
    "at least one iteration": lambda: (
        torch.zeros(1, 4, dtype=torch.long), None,
        {"depth_plan": DepthPlan(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))},
    ),
}  # fmt: skip


@pytest.mark.parametrize(("message", "make"), BAD_INPUTS.items(), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_before_compute(message: str, make) -> None:
    model = Parcae(small())
    calls = []
    model.embed.register_forward_hook(lambda *args: calls.append(1))
    x, labels, kwargs = make()
    with pytest.raises(ValueError, match=message):
        model(x, labels=labels, **kwargs)
    assert not calls


def test_modules_are_plain_torch() -> None:
    model = Parcae(small())
    assert isinstance(model, nn.Module)
    names = {n for n, _ in model.named_parameters()}
    assert {
        "injection.A_log",
        "injection.dt_bias",
        "injection.B",
        "readout.weight",
        "prelude_norm.weight",
    } <= names


def test_half_relu_square_matches_autograd_in_every_mode() -> None:
    from parcae.model.layers import HalfReluSquare

    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    reference = lambda t: 0.5 * torch.relu(t) ** 2  # noqa: E731
    torch.testing.assert_close(HalfReluSquare.apply(z), reference(z))
    assert torch.autograd.gradcheck(HalfReluSquare.apply, (z,))
    assert torch.autograd.gradgradcheck(HalfReluSquare.apply, (z,))
    tangent = torch.randn_like(z)
    ours = torch.func.jvp(HalfReluSquare.apply, (z.detach(),), (tangent,))[1]
    expected = torch.func.jvp(reference, (z.detach(),), (tangent,))[1]
    torch.testing.assert_close(ours, expected)
    batched = torch.func.vmap(HalfReluSquare.apply)(z.detach())
    torch.testing.assert_close(batched, reference(z.detach()))


@pytest.mark.parametrize("variant", ["diagonal", "linear", "swiglu-gqa", "transformer"])
def test_logits_by_depth_equals_one_forward_per_depth(variant: str) -> None:
    torch.manual_seed(0)
    model = randomise(Parcae(small(**VARIANTS[variant]))).eval()
    x = ids(3, 12)
    by_depth = model.logits_by_depth(x, [5, 1, 3], state_seed=2)
    assert sorted(by_depth) == [1, 3, 5]
    for depth, logits in by_depth.items():
        steps = depth if model.config.is_looped else None
        torch.testing.assert_close(logits, model(x, num_steps=steps, state_seed=2).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="positive integers"):
        model.logits_by_depth(x, [0, 2])
    with pytest.raises(ValueError, match=r"model\.eval"):
        model.train().logits_by_depth(x, [2])
