import math

import pytest
import torch

from parcae import Parcae, get_preset
from parcae.train.config import TrainConfig
from parcae.train.optim import MuonAdamW, build_optimizer, orthogonalize, split_parameters
from parcae.train.schedule import lr_multiplier, muon_momentum, muon_weight_decay


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (3, 16, 48)])
def test_polar_express_orthogonalizes(shape) -> None:
    update = torch.randn(*shape)
    singular = torch.linalg.svdvals(orthogonalize(update))
    # Polar Express (5 steps, 2 % safety) maps singular values above ~1e-2·σ_max into about [0.85, 1.15];
    # square Gaussian matrices have a few tinier ones, which 5 steps cannot lift, so look at the bulk.
    assert singular.max() < 1.2
    assert singular.quantile(0.1) > 0.8
    if shape[-1] != shape[-2]:
        assert singular.min() > 0.8
    input_singular = torch.linalg.svdvals(update)
    assert (input_singular.max() / input_singular.min()) > 3  # the input was far from orthogonal


def test_parameter_split_follows_table_20() -> None:
    model = Parcae(get_preset("parcae-micro"))
    muon, adamw = split_parameters(model)
    muon_ids = {id(p) for p in muon}
    names = {n for n, p in model.named_parameters() if id(p) in muon_ids}
    assert names and all(n.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "out_proj", "up_proj", "down_proj"}
                         for n in names)  # fmt: skip
    adam_names = {n for n, p in model.named_parameters() if id(p) not in muon_ids}
    for expected in ("embed.weight", "injection.A_log", "injection.dt_bias", "injection.B", "readout.weight",
                     "final_norm.weight", "prelude_norm.weight"):  # fmt: skip
        assert expected in adam_names
    assert any("ve_gate" in n for n in adam_names)
    assert len(muon) + len(adamw) == len(list(model.parameters()))


def test_adamw_group_matches_torch_adamw() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3))
    b.data.copy_(a.data)
    ours = MuonAdamW([dict(params=[a], algorithm="adamw", lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)])
    reference = torch.optim.AdamW([b], lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(5, 3)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(a.data, b.data, atol=1e-6, rtol=1e-5)


def test_muon_lowers_a_quadratic_loss_and_respects_cautious_decay() -> None:
    torch.manual_seed(0)
    target = torch.randn(16, 32)
    weight = torch.nn.Parameter(torch.zeros(16, 32))
    opt = MuonAdamW([dict(params=[weight], algorithm="muon", lr=0.05, momentum=0.9, weight_decay=0.0, beta2=0.95,
                          ns_steps=5)])  # fmt: skip
    start = (weight - target).square().mean().item()
    for i in range(200):
        opt.param_groups[0]["lr"] = 0.25 * (1 - i / 200)
        loss = (weight - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (weight - target).square().mean().item() < 1e-3 * start


def test_cautious_weight_decay_only_where_update_and_weight_agree() -> None:
    torch.manual_seed(1)
    init, grad = torch.randn(8, 12), torch.randn(8, 12)
    results = {}
    for wd in (0.0, 0.5):
        weight = torch.nn.Parameter(init.clone())
        opt = MuonAdamW([dict(params=[weight], algorithm="muon", lr=0.1, momentum=0.0, weight_decay=wd, beta2=0.95,
                              ns_steps=5)])  # fmt: skip
        weight.grad = grad.clone()
        opt.step()
        results[wd] = weight.detach()
    update = init - results[0.0]  # lr · direction (no decay)
    decay = results[0.0] - results[0.5]  # lr · wd · p · mask
    agree = (update * init) >= 0
    assert agree.any() and (~agree).any()
    torch.testing.assert_close(decay[~agree], torch.zeros_like(decay[~agree]))
    torch.testing.assert_close(decay[agree], 0.1 * 0.5 * init[agree])


def test_build_optimizer_adamw_only() -> None:
    model = Parcae(get_preset("parcae-micro"))
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3))
    assert [g["algorithm"] for g in opt.param_groups] == ["adamw"]
    assert [g["algorithm"] for g in build_optimizer(model, TrainConfig()).param_groups] == ["adamw", "muon"]
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, TrainConfig(optimizer="sgd"))


def test_schedules() -> None:
    assert lr_multiplier(0.0, "trapezoid", 0.0, 0.5) == 1.0
    assert lr_multiplier(0.49, "trapezoid", 0.0, 0.5) == 1.0
    assert math.isclose(lr_multiplier(0.75, "trapezoid", 0.0, 0.5), 0.5)
    assert lr_multiplier(1.0, "trapezoid", 0.0, 0.5) == 0.0
    assert math.isclose(lr_multiplier(0.05, "trapezoid", 0.1, 0.5), 0.5)
    assert math.isclose(lr_multiplier(0.55, "cosine", 0.1, 0.0), 0.5)
    assert math.isclose(lr_multiplier(1.0, "cosine", 0.0, 0.0, min_ratio=0.1), 0.1)
    assert muon_momentum(0) == 0.85 and muon_momentum(300) == 0.95 and math.isclose(muon_momentum(150), 0.9)
    assert muon_weight_decay(0.5, 0.2) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0.5, "linear", 0, 0)
