"""Official parcae-lm checkpoints: conversion, logit parity against an independent reference, strict loading.

The official model is rebuilt here from its description (docs/official-format.md), written independently of
`parcae.interop`: `official_checkpoint` creates the state dict and config.json the official
`save_pretrained` would write, and `official_forward` runs that state dict with the official semantics
(interleaved RoPE rotated pair by pair, official value-embedding gating, RMSNorm with eps, 0.5·relu², C before
the coda, tied head) on a zero initial state.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from parcae import Parcae, count_params, get_preset
from parcae.interop.official import (
    convert_state_dict,
    from_parcae_lm,
    from_parcae_lm_with_report,
    interleaved_to_rotate_half,
    parameter_count,
    to_parcae_lm,
)
from parcae.interop.official_files import read_parcae_lm
from parcae.model.layers import Rotary, apply_rotary
from reference import rms

SHARED_FORMAT = Path(__file__).resolve().parents[3] / "shared" / "docs" / "official-format"

# The config.json the official save_pretrained writes for a small model (d 128, 2/2/2 layers, vocab 256);
# `test_generator_writes_the_documented_format` checks it against the shared example when that is present.
EXAMPLE_CONFIG = {
    "name": "parcae-small-140m", "hf_config": {"org": "SandyResearch", "name": "parcae-small-140m"},
    "block_size": 256, "n_embd": 128, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 2,
    "vocab_size": 256, "padding_multiple": 64, "padded_vocab_size": 256,
    "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000},
    "use_abacus": False, "randomize_positions_from": None, "block_class_name": "TransformerPreNormBlock",
    "norm_class_name": "RMSNorm", "attn_impl": "flash", "norm_eps": 1e-05, "mlp_class_name": "BaseMLP",
    "nonlin_name": "ReLU2", "bias": False, "qk_bias": False, "init_strategy": "scaled-zero", "init_orthogonal": True,
    "skip_initialization": False, "mup_model_scaling_factor": 1, "use_fused_head": "pytorch",
    "debias_attention": False, "center_attention": False, "clip_qkv": None, "qk_norm": True, "logit_softcap": None,
    "activation_checkpoint_impl": "per-iteration", "simple_ops": False, "strategy": "single",
    "injection_type": "diagonal", "n_layers_in_recurrent_block": 2, "n_layers_in_prelude": 2, "n_layers_in_coda": 2,
    "state_init": "like-init", "recurrent_embedding_dimension": 128,
    "recurrent_intermediation_embedding_dimension": 512, "recurrent_num_attention_heads": None, "prelude_norm": True,
    "sampling_scheme": "poisson-truncated-full",
    "mean_recurrence": 4, "mean_backprop_depth": 2, "lockstep_n": False, "lockstep_k": False,
    "curriculum_target": "forward", "recurrent_iteration_method": "per-sequence", "tie_embeddings": True,
    "model_class_name": "Parcae", "_is_recurrent_block_config": False, "_class_name": "ParcaeConfig",
}  # fmt: skip

# Shapes the official format can express, chosen to exercise what differs between the implementations.
VARIANTS = {
    "example": {},
    # GQA in prelude/coda (never in the core); the gate rule (n_layer = 1·2) disagrees with the tables: the
    # prelude's table 0 and gate on prelude.1 are unused, only coda.1 uses its value embedding.
    "gqa-ve-quirk": {"num_attention_heads": 4, "num_key_value_heads": 2, "n_layers_in_prelude": 2,
                     "n_layers_in_recurrent_block": 1, "n_layers_in_coda": 2, "mean_backprop_depth": 2},
    # A wider state than the model (d_state 192 = 3 core heads of width 64) with the concat-projection injection.
    "wide-state-linear": {"recurrent_embedding_dimension": 192, "recurrent_num_attention_heads": 3,
                          "recurrent_intermediation_embedding_dimension": 384, "n_layers_in_recurrent_block": 1,
                          "injection_type": "linear"},
    # No prelude; a narrower state (64 = 2 core heads of 32) whose core layer 1 uses a value embedding: the
    # table is as wide as the prelude's GQA kv width (2 × 32), which the official code requires.
    "no-prelude-narrow-state": {"num_attention_heads": 4, "num_key_value_heads": 2, "n_layers_in_prelude": 0,
                                "recurrent_embedding_dimension": 64, "recurrent_num_attention_heads": 2,
                                "recurrent_intermediation_embedding_dimension": 256},
    # Odd counts: 3 core layers, odd mean_recurrence and backprop depth, so tables and gates agree differently.
    "odd-layers": {"n_layers_in_prelude": 1, "n_layers_in_recurrent_block": 3, "n_layers_in_coda": 1,
                   "mean_recurrence": 3, "mean_backprop_depth": 3, "intermediate_size": 384,
                   "recurrent_intermediation_embedding_dimension": 320},
    # Additive injection, no prelude norm, an untied head, no QK-norm, another RoPE base and eps, padded vocab.
    "add-untied": {"injection_type": "add", "prelude_norm": False, "tie_embeddings": False, "qk_norm": False,
                   "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 10000},
                   "norm_eps": 1e-6, "vocab_size": 250, "padded_vocab_size": 256, "n_layers_in_coda": 0},
}  # fmt: skip


def has_ve(layer: int, n_layer: int) -> bool:
    return layer % 2 == (n_layer - 1) % 2


def shape_of(cfg: dict) -> dict:
    heads = cfg["num_attention_heads"]
    core_heads = cfg["recurrent_num_attention_heads"] or heads
    return {
        "C": cfg["n_embd"], "H": heads, "Hkv": cfg["num_key_value_heads"] or heads, "D": cfg["n_embd"] // heads,
        "F": cfg["intermediate_size"], "S": cfg["recurrent_embedding_dimension"], "Hc": core_heads,
        "Fc": cfg["recurrent_intermediation_embedding_dimension"], "V": cfg["padded_vocab_size"],
        "pre": cfg["n_layers_in_prelude"], "core": cfg["n_layers_in_recurrent_block"], "coda": cfg["n_layers_in_coda"],
    }  # fmt: skip


def official_blocks(cfg: dict) -> list[tuple[str, int, bool]]:
    """(official block name, official layer_id, is core) in distinct-layer order."""
    s = shape_of(cfg)
    coda_id = s["pre"] + s["core"] * cfg["mean_recurrence"]
    return (
        [(f"prelude.{j}", j, False) for j in range(s["pre"])]
        + [(f"core_block.{j}", s["pre"] + j, True) for j in range(s["core"])]
        + [(f"coda.{j}", coda_id + j, False) for j in range(s["coda"])]
    )


def rope_table(positions: int, head_dim: int, base: float) -> Tensor:
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None, :, None]


def official_checkpoint(seed: int = 0, **overrides) -> tuple[dict[str, Tensor], dict]:
    """The (state_dict, config.json) the official model would save, with random weights of moderate scale."""
    cfg = {**copy.deepcopy(EXAMPLE_CONFIG), **overrides}
    s = shape_of(cfg)
    gen = torch.Generator().manual_seed(seed)
    meta = torch.empty(0).is_meta  # built under torch.device("meta") for the 140m shapes

    def rand(*shape: int, std: float = 1.0, mean: float = 0.0) -> Tensor:
        if meta:
            return torch.empty(shape)
        return mean + std * torch.randn(shape, generator=gen)

    def linear(rows: int, cols: int) -> Tensor:
        return rand(rows, cols, std=1 / math.sqrt(cols))

    state = {"freqs_cis": rope_table(cfg["block_size"], s["D"], cfg["rope_settings"]["rope_base"])}
    if meta:
        state["freqs_cis"] = torch.empty(state["freqs_cis"].shape)
    state["transformer.wte.weight"] = rand(s["V"], s["C"], std=0.1)
    n_layer = s["core"] * cfg["mean_backprop_depth"]
    for block, layer_id, core in official_blocks(cfg):
        width, heads = (s["S"], s["Hc"]) if core else (s["C"], s["H"])
        kv, mlp, dh = (heads if core else s["Hkv"]), (s["Fc"] if core else s["F"]), width // heads
        p = f"transformer.{block}."
        state[p + "norm_1.weight"] = rand(width, std=0.1, mean=1.0)
        state[p + "attn.c_q.weight"] = linear(heads * dh, width)
        state[p + "attn.c_k.weight"] = linear(kv * dh, width)
        state[p + "attn.c_v.weight"] = linear(kv * dh, width)
        state[p + "attn.c_proj.weight"] = linear(width, width)
        if has_ve(layer_id, n_layer):
            state[p + "attn.ve_gate.weight"] = rand(kv, 32, std=0.3)
        state[p + "norm_2.weight"] = rand(width, std=0.1, mean=1.0)
        state[p + "mlp.fc.weight"] = linear(mlp, width)
        state[p + "mlp.proj.weight"] = linear(width, mlp)
    if cfg["injection_type"] == "diagonal":
        state["transformer.adapter.A_log"] = rand(s["S"], std=0.3)
        state["transformer.adapter.dt_bias"] = rand(s["S"], std=0.5)
        state["transformer.adapter.B"] = linear(s["S"], s["C"])
    elif cfg["injection_type"] == "linear":
        state["transformer.adapter.adapter.weight"] = linear(s["S"], s["S"] + s["C"])
    state["transformer.C.weight"] = linear(s["C"], s["S"])
    state["transformer.ln_f.weight"] = rand(s["C"], std=0.1, mean=1.0)
    if cfg["prelude_norm"]:
        state["transformer.ln_prelude.weight"] = rand(s["C"], std=0.1, mean=1.0)
    n_effective = s["pre"] + s["core"] + s["coda"]
    for i in range(n_effective):
        if has_ve(i, n_effective):
            state[f"value_embeds.{i}.weight"] = rand(s["V"], s["Hkv"] * s["D"])
    tied = cfg["tie_embeddings"]
    state["lm_head.weight"] = state["transformer.wte.weight"] if tied else rand(s["V"], s["C"], std=0.1)
    return state, cfg


def rotate_pairs(x: Tensor, base: float) -> Tensor:
    """Interleaved RoPE on [B, L, H, D], one explicit 2×2 rotation per channel pair (2i, 2i+1)."""
    out = torch.empty_like(x)
    dim = x.shape[-1]
    pos = torch.arange(x.shape[1], dtype=torch.float32)[None, :, None]
    for i in range(dim // 2):
        angle = pos * (1.0 / base ** (2 * i / dim))
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * angle.cos() - b * angle.sin()
        out[..., 2 * i + 1] = a * angle.sin() + b * angle.cos()
    return out


def rotate_interleaved(x: Tensor, base: float) -> Tensor:
    """The same rotation for all pairs at once: (x[2i], x[2i+1]) as a complex number times e^{i·pos·θ_i}."""
    dim = x.shape[-1]
    pairs = x.float().unflatten(-1, (dim // 2, 2))
    table = rope_table(x.shape[1], dim, base)[0, :, :, :]  # [L, 1, D/2, 2]
    rotated = torch.view_as_complex(pairs.contiguous()) * torch.view_as_complex(table.contiguous())
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


def official_forward(state: dict[str, Tensor], cfg: dict, ids: Tensor, num_steps: int) -> Tensor:
    """Logits of the official model for `ids`, with a zero initial state and `num_steps` iterations."""
    s = shape_of(cfg)
    eps, base = cfg["norm_eps"], float(cfg["rope_settings"]["rope_base"])
    n_layer = s["core"] * cfg["mean_backprop_depth"]
    n_effective = s["pre"] + s["core"] + s["coda"]

    def block(x: Tensor, name: str, layer_id: int, table: int, core: bool) -> Tensor:
        p = f"transformer.{name}."
        batch, length, width = x.shape
        heads = s["Hc"] if core else s["H"]
        kv, dh = (heads if core else s["Hkv"]), width // heads
        xn = rms(x, state[p + "norm_1.weight"], eps)
        q = (xn @ state[p + "attn.c_q.weight"].T).view(batch, length, heads, dh)
        k = (xn @ state[p + "attn.c_k.weight"].T).view(batch, length, kv, dh)
        v = (xn @ state[p + "attn.c_v.weight"].T).view(batch, length, kv, dh)
        gate_key = p + "attn.ve_gate.weight"
        if has_ve(table, n_effective) and has_ve(layer_id, n_layer):  # used only when table and gate both exist
            ve = state[f"value_embeds.{table}.weight"][ids].view(batch, length, kv, dh)
            v = v + 2 * torch.sigmoid(xn[..., :32] @ state[gate_key].T)[..., None] * ve
        q, k = rotate_interleaved(q, base), rotate_interleaved(k, base)
        if cfg["qk_norm"]:
            q, k = rms(q), rms(k)
        k, v = k.repeat_interleave(heads // kv, dim=2), v.repeat_interleave(heads // kv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(future, -math.inf).softmax(-1), v)
        x = x + attn.reshape(batch, length, width) @ state[p + "attn.c_proj.weight"].T
        hidden = rms(x, state[p + "norm_2.weight"], eps) @ state[p + "mlp.fc.weight"].T
        return x + (0.5 * torch.relu(hidden) ** 2) @ state[p + "mlp.proj.weight"].T

    blocks = official_blocks(cfg)
    x = state["transformer.wte.weight"][ids]
    for i in range(s["pre"]):
        x = block(x, blocks[i][0], blocks[i][1], i, False)
    e = rms(x, state["transformer.ln_prelude.weight"], eps) if cfg["prelude_norm"] else x
    h = torch.zeros(*ids.shape, s["S"])
    for _ in range(num_steps):
        if cfg["injection_type"] == "diagonal":
            dt = F.softplus(state["transformer.adapter.dt_bias"])
            decay = torch.exp(-dt * torch.exp(state["transformer.adapter.A_log"]))
            h = h * decay + dt * (e @ state["transformer.adapter.B"].T)
        elif cfg["injection_type"] == "linear":
            h = torch.cat([h, e], dim=-1) @ state["transformer.adapter.adapter.weight"].T
        else:
            h = h + e
        for j in range(s["core"]):
            i = s["pre"] + j
            h = block(h, blocks[i][0], blocks[i][1], i, True)
    x = h @ state["transformer.C.weight"].T
    for j in range(s["coda"]):
        i = s["pre"] + s["core"] + j
        x = block(x, blocks[i][0], blocks[i][1], i, False)
    x = rms(x, state["transformer.ln_f.weight"], eps)
    return x @ state["lm_head.weight"].T


# ---------------------------------------------------------------------- the format itself
@pytest.mark.skipif(not SHARED_FORMAT.is_dir(), reason="../shared/docs/official-format is not present")
def test_generator_writes_the_documented_format() -> None:
    """The test's official checkpoint has exactly the keys, shapes and config of the documented example."""
    assert json.loads((SHARED_FORMAT / "config.json").read_text()) == EXAMPLE_CONFIG
    documented = {}
    for line in (SHARED_FORMAT / "state_dict_keys.txt").read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        documented[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    state, _ = official_checkpoint()
    assert {k: tuple(v.shape) for k, v in state.items()} == documented


def test_interleaved_rope_equals_rotate_half_after_the_row_permutation() -> None:
    """q·k with official interleaved RoPE = ours after permuting c_q/c_k rows, with and without QK-norm."""
    batch, length, heads, dim, width = 2, 7, 3, 16, 24
    x = torch.randn(batch, length, width)
    wq, wk = torch.randn(heads * dim, width), torch.randn(heads * dim, width)
    cos, sin = Rotary(dim, length, 500.0).tables(length)
    for qk_norm in (False, True):
        norm = (lambda t: F.rms_norm(t, (dim,))) if qk_norm else (lambda t: t)
        q_off = norm(rotate_pairs((x @ wq.T).view(batch, length, heads, dim), 500.0))
        k_off = norm(rotate_pairs((x @ wk.T).view(batch, length, heads, dim), 500.0))
        torch.testing.assert_close(norm(rotate_interleaved((x @ wq.T).view(batch, length, heads, dim), 500.0)), q_off)
        q = (x @ interleaved_to_rotate_half(wq, dim).T).view(batch, length, heads, dim)
        k = (x @ interleaved_to_rotate_half(wk, dim).T).view(batch, length, heads, dim)
        q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)
        official = torch.einsum("bqhd,bkhd->bhqk", q_off, k_off)
        ours = torch.einsum("bqhd,bkhd->bhqk", q, k)
        torch.testing.assert_close(ours, official, atol=1e-4, rtol=1e-5)
        # Without the permutation the layouts disagree: the test can fail.
        q_raw = apply_rotary(norm((x @ wq.T).view(batch, length, heads, dim)), cos, sin)
        k_raw = apply_rotary(norm((x @ wk.T).view(batch, length, heads, dim)), cos, sin)
        assert (torch.einsum("bqhd,bkhd->bhqk", q_raw, k_raw) - official).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("overrides", "used", "dropped"),
    [
        ({}, (1, 3, 5), set()),
        # n_layer = 1·2: gates on odd layer ids (prelude.1, coda.1 at id 2+4+1); tables on even layers {0, 2, 4}.
        (VARIANTS["gqa-ve-quirk"], (4,),
         {"value_embeds.0.weight", "value_embeds.2.weight", "transformer.prelude.1.attn.ve_gate.weight"}),
        # L = 4 → tables {1, 3}; n_layer = 1 → gates on even ids: prelude.0 (0), core_block.0 (2); coda id 5.
        ({"n_layers_in_recurrent_block": 1, "n_layers_in_coda": 1, "mean_recurrence": 3, "mean_backprop_depth": 1},
         (), {"value_embeds.1.weight", "value_embeds.3.weight", "transformer.prelude.0.attn.ve_gate.weight",
              "transformer.core_block.0.attn.ve_gate.weight"}),
    ],
    ids=["example", "gqa-quirk", "none-used"],
)  # fmt: skip
def test_value_embeddings_follow_the_official_table_and_gate_rules(overrides, used, dropped) -> None:
    state, cfg = official_checkpoint(**overrides)
    config, _, report = convert_state_dict(state, cfg)
    assert config.value_embedding_layers == used
    assert config.value_embeddings == bool(used)
    assert set(report.dropped) == dropped | {"freqs_cis", "lm_head.weight"}


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_model_matches_the_official_forward(variant: str) -> None:
    state, cfg = official_checkpoint(seed=1, **VARIANTS[variant])
    model = from_parcae_lm(state, cfg, state_init="zero")
    assert not model.training
    ids = torch.randint(0, cfg["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    for num_steps in (1, 4, 8):
        expected = official_forward(state, cfg, ids, num_steps)
        logits = model(ids, num_steps=num_steps).logits
        assert expected.abs().max() > 0.5  # the comparison is not between near-zero tensors
        assert (logits - expected).abs().max().item() <= 1e-4, (variant, num_steps)
    single = model(ids[:, :1], num_steps=4).logits  # a one-token sequence
    torch.testing.assert_close(single, official_forward(state, cfg, ids[:, :1], 4), atol=1e-4, rtol=0)


def test_zero_state_from_the_config_and_official_state_inits() -> None:
    state, cfg = official_checkpoint()
    assert from_parcae_lm(state, cfg).config.state_init == "like-init"
    assert from_parcae_lm(state, {**cfg, "state_init": "zero"}).config.state_init == "zero"
    with pytest.raises(ValueError, match="state_init 'unit' has no equivalent"):
        from_parcae_lm(state, {**cfg, "state_init": "unit"})
    assert from_parcae_lm(state, {**cfg, "state_init": "unit"}, state_init="zero").config.state_init == "zero"


def test_missing_fields_take_the_official_defaults() -> None:
    state, cfg = official_checkpoint()
    slim = {k: v for k, v in cfg.items() if k not in ("num_key_value_heads", "rope_settings", "padded_vocab_size")}
    slim["num_key_value_heads"] = None  # → the head count, as the official config does
    model = from_parcae_lm(state, slim)
    assert (model.config.n_kv_heads, model.config.rope_base, model.config.vocab_size) == (2, 50_000.0, 256)
    _, report = from_parcae_lm_with_report(state, {**cfg, "future_knob": 1})  # reported, not silently ignored
    assert any("future_knob" in note for note in report.notes)
    # The official config object itself (a dataclass with a nested RoPESettings dataclass) works too.
    import dataclasses

    rope_cls = dataclasses.make_dataclass("RoPESettings", list(cfg["rope_settings"]))
    fields = {k: v for k, v in cfg.items() if not k.startswith("_")}
    config_cls = dataclasses.make_dataclass("ParcaeConfig", list(fields))
    official = config_cls(**{**fields, "rope_settings": rope_cls(**cfg["rope_settings"])})
    assert from_parcae_lm(state, official).config == from_parcae_lm(state, cfg).config


# ---------------------------------------------------------------------- round trips
def test_parcae_140m_round_trips_on_the_meta_device() -> None:
    preset = get_preset("parcae-140m")
    with torch.device("meta"):
        model = Parcae(preset)
        documented, _ = official_checkpoint(
            n_embd=768, intermediate_size=3072, num_attention_heads=6, num_key_value_heads=6, vocab_size=32768,
            padded_vocab_size=32768, block_size=2048, recurrent_embedding_dimension=768,
            recurrent_intermediation_embedding_dimension=3072, mean_recurrence=8, mean_backprop_depth=4,
        )  # fmt: skip
    state, config_dict = to_parcae_lm(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in documented.items()}
    assert parameter_count(state, config_dict) == count_params(preset)
    back, converted, _ = convert_state_dict(state, config_dict)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    assert (back.d_model, back.n_heads, back.d_mlp, back.core_heads, back.core_kv_heads, back.core_d_mlp) == (
        preset.d_model, preset.n_heads, preset.d_mlp, preset.core_heads, preset.core_kv_heads, preset.core_d_mlp,
    )  # fmt: skip
    assert [back.has_value_embedding(i) for i in range(6)] == [preset.has_value_embedding(i) for i in range(6)]


@pytest.mark.parametrize("name", ["parcae-tiny", "rdm-linear-tiny"])
def test_export_and_import_are_inverse(name: str) -> None:
    model = Parcae(get_preset(name, state_init="zero")).eval()
    with torch.no_grad():  # non-trivial weights everywhere (the init zeroes the output projections)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state, config_dict = to_parcae_lm(model)
    again = from_parcae_lm(state, config_dict)
    assert set(again.state_dict()) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key
    ids = torch.randint(0, 256, (2, 11))
    assert torch.equal(again(ids, num_steps=3).logits, model(ids, num_steps=3).logits)
    # The exported state dict is the official model's: the independent reference agrees with our model.
    expected = official_forward(state, config_dict, ids, 3)
    assert (model(ids, num_steps=3).logits - expected).abs().max() <= 1e-4


# ---------------------------------------------------------------------- bad input
def _with(state: dict, drop: tuple[str, ...] = (), **add: Tensor) -> dict:
    return {**{k: v for k, v in state.items() if k not in drop}, **add}


@pytest.mark.parametrize(
    ("message", "change"),
    [
        ("missing transformer.coda.1.mlp.fc.weight", lambda s, c: (_with(s, ("transformer.coda.1.mlp.fc.weight",)), c)),
        ("unexpected transformer.extra.weight", lambda s, c: ({**s, "transformer.extra.weight": torch.ones(1)}, c)),
        (r"wrong shapes .*transformer.core_block.0.attn.c_q.weight \(64, 128\)",
         lambda s, c: ({**s, "transformer.core_block.0.attn.c_q.weight": torch.ones(64, 128)}, c)),
        ("lm_head.weight differs", lambda s, c: ({**s, "lm_head.weight": s["lm_head.weight"] + 1}, c)),
        ("freqs_cis does not match rope_base", lambda s, c: ({**s, "freqs_cis": rope_table(256, 64, 10_000)}, c)),
        ("freqs_cis has shape", lambda s, c: (s, {**c, "block_size": 512})),
        ("logit_softcap = 30", lambda s, c: (s, {**c, "logit_softcap": 30})),
        ("bias = True", lambda s, c: (s, {**c, "bias": True})),
        ("nonlin_name = 'GELU'", lambda s, c: (s, {**c, "nonlin_name": "GELU"})),
        ("block_class_name = 'SandwichBlock'", lambda s, c: (s, {**c, "block_class_name": "SandwichBlock"})),
        ("mup_model_scaling_factor = 2", lambda s, c: (s, {**c, "mup_model_scaling_factor": 2})),
        ("_class_name = 'GPTConfig'", lambda s, c: (s, {**c, "_class_name": "GPTConfig"})),
        ("not an official Parcae config", lambda s, c: (s, {"n_layer": 12, "n_embd": 128})),
        ("set recurrent_num_attention_heads to 3",
         lambda s, c: (s, {**c, "recurrent_embedding_dimension": 192, "recurrent_num_attention_heads": None})),
        ("non-tensor entries", lambda s, c: ({**s, "step": 3}, c)),
    ],
    ids=["missing", "unexpected", "shape", "untied-head", "rope-base", "rope-length", "softcap", "bias", "gelu",
         "sandwich", "mup", "gpt", "not-parcae", "core-heads", "non-tensor"],
)  # fmt: skip
def test_bad_checkpoints_raise_one_clear_error(message: str, change) -> None:
    state, cfg = change(*official_checkpoint())
    with pytest.raises(ValueError, match=message):
        from_parcae_lm(state, cfg)


def test_unused_value_embeddings_may_be_absent_but_used_ones_may_not() -> None:
    state, cfg = official_checkpoint(**VARIANTS["gqa-ve-quirk"])
    from_parcae_lm(_with(state, ("value_embeds.0.weight", "transformer.prelude.1.attn.ve_gate.weight")), cfg)
    with pytest.raises(ValueError, match=r"missing value_embeds\.4\.weight"):
        from_parcae_lm(_with(state, ("value_embeds.4.weight",)), cfg)


# ---------------------------------------------------------------------- files
def test_reads_pickles_safetensors_shards_and_wrapper_prefixes(tmp_path: Path) -> None:
    state, cfg = official_checkpoint()
    model = from_parcae_lm(state, cfg, state_init="zero")
    ids = torch.randint(0, 256, (1, 5))
    expected = model(ids, num_steps=2).logits

    def check(directory: Path) -> None:
        (directory / "config.json").write_text(json.dumps(cfg))
        loaded_state, loaded_cfg = read_parcae_lm(directory)
        loaded, report = from_parcae_lm_with_report(loaded_state, loaded_cfg, state_init="zero")
        assert torch.equal(loaded(ids, num_steps=2).logits, expected)
        assert "freqs_cis" in report.dropped

    (tmp_path / "pt").mkdir()
    torch.save({f"_orig_mod.module.{k}": v for k, v in state.items()}, tmp_path / "pt" / "model.pt")
    check(tmp_path / "pt")
    (tmp_path / "bin").mkdir()
    torch.save({"model": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "bin" / "pytorch_model.bin")
    check(tmp_path / "bin")
    (tmp_path / "st").mkdir()
    plain = {k: v.clone().contiguous() for k, v in state.items()}  # safetensors stores no shared tensors
    keys = sorted(plain)
    save_file({k: plain[k] for k in keys[::2]}, str(tmp_path / "st" / "model-00001-of-00002.safetensors"))
    save_file({k: plain[k] for k in keys[1::2]}, str(tmp_path / "st" / "model-00002-of-00002.safetensors"))
    check(tmp_path / "st")


class _Arbitrary:
    pass


def test_refuses_pickles_that_are_not_weights_only(tmp_path: Path) -> None:
    state, cfg = official_checkpoint()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save({"weights": state, "payload": _Arbitrary()}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        read_parcae_lm(tmp_path)
    torch.save([1, 2, 3], tmp_path / "model.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_parcae_lm(tmp_path)
    (tmp_path / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        read_parcae_lm(tmp_path)


def test_colliding_prefixes_are_an_error() -> None:
    state, cfg = official_checkpoint()
    with pytest.raises(ValueError, match="collide"):
        from_parcae_lm({**state, "module.transformer.ln_f.weight": state["transformer.ln_f.weight"]}, cfg)


# ---------------------------------------------------------------------- parcae convert
def test_convert_cli_writes_a_directory_our_loaders_read(tmp_path: Path, capsys) -> None:
    from parcae.cli import main
    from parcae.train.run import open_run

    state, cfg = official_checkpoint(**VARIANTS["add-untied"])
    src = tmp_path / "official"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "tokenizer.json").write_text('{"model": {"type": "BPE"}, "oops": true}')
    assert main(["convert", "--from", "parcae-lm", str(src), str(tmp_path / "out")]) == 2
    assert "--no-tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
    assert main(["convert", "--from", "parcae-lm", "--no-tokenizer", str(src), str(tmp_path / "out")]) == 0
    assert "vocabulary padded from 250 to 256 rows" in capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "parcae" and written["value_embedding_layers"] == [1, 3]
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["vocab_limit"] == 250
    model = Parcae.from_pretrained(tmp_path / "out").eval()
    assert model.config == from_parcae_lm(state, cfg).config
    ids = torch.randint(0, 250, (1, 6))
    assert (model(ids, num_steps=4).logits - from_parcae_lm(state, cfg)(ids, num_steps=4).logits).abs().max() == 0
    with pytest.raises(FileNotFoundError, match="No tokenizer file"):  # our run loader needs one: convert said so
        open_run(tmp_path / "out")
    # An existing, non-empty destination is never overwritten.
    assert main(["convert", "--from", "parcae-lm", "--no-tokenizer", str(src), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_convert_from_a_run_reports_the_value_embedding_layers_it_uses(tmp_path: Path, capsys) -> None:
    from parcae.cli import main
    from parcae.data.tokenizer import ByteTokenizer

    # The alternating rule leaves `value_embedding_layers` unset; the summary must still name the layers.
    cfg = get_preset("parcae-micro")
    assert cfg.value_embedding_layers is None
    expected = [i for i in range(cfg.n_layers) if cfg.has_value_embedding(i)]
    assert expected
    Parcae(cfg).save_pretrained(tmp_path / "saved")
    ByteTokenizer().save(tmp_path / "saved")
    assert main(["convert", "--from", "run", str(tmp_path / "saved"), str(tmp_path / "out")]) == 0
    assert f"value embeddings on layers {expected}" in capsys.readouterr().out
    no_ve = get_preset("parcae-micro", value_embeddings=False)
    Parcae(no_ve).save_pretrained(tmp_path / "plain")
    ByteTokenizer().save(tmp_path / "plain")
    assert main(["convert", "--from", "run", str(tmp_path / "plain"), str(tmp_path / "out2")]) == 0
    assert "value embeddings on layers []" in capsys.readouterr().out


# ---------------------------------------------------------------------- the config fields imports rely on
def test_explicit_core_shapes_and_value_embedding_layers() -> None:
    from parcae import ParcaeConfig

    cfg = get_preset("parcae-tiny", value_embedding_layers=[5, 0], n_core_heads=2, n_core_kv_heads=1, d_core_mlp=96)
    assert cfg.value_embedding_layers == (0, 5)
    assert ParcaeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # survives config.json
    model = Parcae(cfg)
    assert sorted(model.value_embeds) == ["0", "5"]
    gates = [block.attn.ve_gate is not None for block in model.blocks()]
    assert gates == [True, False, False, False, False, True]
    core = model.core[0]
    assert (core.attn.n_heads, core.attn.n_kv_heads, core.mlp.up_proj.out_features) == (2, 1, 96)
    # Unset, the fields keep today's derived values (and parameter counts).
    assert count_params(get_preset("parcae-tiny", n_core_heads=None)) == count_params(get_preset("parcae-tiny"))
    for bad, message in [
        ({"value_embedding_layers": [6]}, "must lie in"),
        ({"value_embedding_layers": "1,3"}, "value_embedding_layers must be a list of integers"),
        ({"n_core_heads": 3}, "n_core_heads × head_dim"),
        ({"n_core_kv_heads": 3}, "multiple of n_core_kv_heads"),
        ({"d_core_mlp": 0}, "d_core_mlp must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            get_preset("parcae-tiny", **bad)


def test_config_files_may_carry_transformers_metadata() -> None:
    from parcae import ParcaeConfig

    cfg = get_preset("parcae-micro")
    data = {**cfg.to_dict(), "model_type": "parcae", "architectures": ["ParcaeForCausalLM"], "dtype": "float32",
            "transformers_version": "5.24.0"}  # fmt: skip
    assert ParcaeConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="Unknown ParcaeConfig field"):
        ParcaeConfig.from_dict({**data, "hidden_size": 64})
