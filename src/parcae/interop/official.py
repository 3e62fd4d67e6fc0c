"""Official `parcae-lm` checkpoints ⇄ Parcae models, and the Hugging Face file layout of a model directory.

`from_parcae_lm(state_dict, config_dict)` turns the official implementation's `state_dict()` and `config.json`
(as its `save_pretrained` writes them) into a `Parcae` whose logits match the official forward pass. What differs
between the two implementations, and how the conversion bridges it (the whole format: docs/official-format.md):

- **RoPE layout.** The official code rotates interleaved pairs (2i, 2i+1) by pos·θ^(−2i/D); ours rotates
  (i, i + D/2) by the same angle (rotate-half). Permuting each head's rows of `c_q` and `c_k` by
  (2i → i, 2i+1 → i + D/2) makes the two equal: q·k is a sum over channels and the parameter-free QK-norm is
  a norm over them, both invariant under one permutation applied to q and k. `c_v` and `c_proj` are untouched.
- **Value embeddings.** The official model holds a table for every distinct layer i with has_ve(i, L)
  (L = n_prelude + n_core + n_coda) but a gate only where has_ve(layer_id, n_layer), with the bogus
  n_layer = n_core · mean_backprop_depth and layer ids prelude j, core n_prelude + j, coda
  n_prelude + n_core · mean_recurrence + j. A layer uses its value embedding only when both exist. The converted
  config lists exactly those layers in `value_embedding_layers`; tables and gates the official forward never
  reads are dropped and reported (`ConversionReport.dropped`), never silently.
- **Core shapes.** The core block has its own width (`recurrent_embedding_dimension`), MLP width and head count
  (`recurrent_num_attention_heads`, null → `num_attention_heads`), and no GQA; they become `d_state`,
  `d_core_mlp`, `n_core_heads` and `n_core_kv_heads`.
- **Buffers and ties.** `freqs_cis` (a persistent buffer) is checked against the config's RoPE and dropped;
  a tied `lm_head.weight` is checked equal to `transformer.wte.weight` and dropped.

Loading is strict: every tensor is consumed or on the documented ignore list, every parameter is filled, and
shapes match; otherwise a ValueError names the official keys, and no model is returned. Files are read with
`torch.load(weights_only=True)` or safetensors only. Features our model does not implement (sandwich norms,
softcapped logits, QKV clipping, biases, …) raise a ValueError naming the config field.

The second half writes the extra files that make a `save_pretrained` directory loadable by Hugging Face
transformers (`model_type` in config.json, a tokenizer as a `PreTrainedTokenizerFast`), without importing
transformers, so `parcae convert` works with the core dependencies only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..model.config import ParcaeConfig
from ..model.parcae import CONFIG_FILE, Parcae

# ---------------------------------------------------------------------- the official format
# Prefixes that wrappers add to state-dict keys (DDP, torch.compile, a training module); the official loader
# strips them too.
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
# Weight files of an official checkpoint directory, in order of preference (safetensors may be sharded).
OFFICIAL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")

# Defaults of the official config dataclasses (`Config` and `ParcaeConfig`), used for fields a config.json
# leaves out, exactly as the official constructor would.
_OFFICIAL_DEFAULTS: dict[str, Any] = {
    "name": "",
    "block_size": 4096,
    "n_embd": 4096,
    "intermediate_size": None,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "vocab_size": 50254,
    "padding_multiple": 512,
    "padded_vocab_size": None,
    "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50_000},
    "use_abacus": False,
    "randomize_positions_from": None,
    "block_class_name": "TransformerPreNormBlock",
    "norm_class_name": "LayerNorm",
    "attn_impl": "flash",
    "norm_eps": 1e-5,
    "mlp_class_name": "BaseMLP",
    "nonlin_name": "GELU",
    "bias": False,
    "qk_bias": False,
    "init_strategy": "scaled",
    "mup_model_scaling_factor": 1,
    "use_fused_head": "pytorch",
    "clip_qkv": None,
    "qk_norm": False,
    "logit_softcap": None,
    "injection_type": "diagonal",
    "n_layers_in_recurrent_block": 4,
    "n_layers_in_prelude": 1,
    "n_layers_in_coda": 1,
    "state_init": "like-init",
    "recurrent_embedding_dimension": 1024,
    "recurrent_intermediation_embedding_dimension": 3520,
    "recurrent_num_attention_heads": None,
    "prelude_norm": False,
    "sampling_scheme": "poisson-truncated-full",
    "mean_recurrence": 32,
    "mean_backprop_depth": 8,
    "recurrent_iteration_method": "per-batch",
    "tie_embeddings": False,
}

# Fields that must hold one of these values: anything else changes the forward pass in a way our model does
# not implement. (field → (allowed values, what the field does))
_SUPPORTED_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "block_class_name": (("TransformerPreNormBlock",), "only plain pre-norm blocks (no sandwich/post norms)"),
    "norm_class_name": (("RMSNorm",), "only RMSNorm"),
    "mlp_class_name": (("BaseMLP",), "only the two-matrix MLP"),
    "nonlin_name": (("ReLU2",), "only ReLU² (0.5·relu(x)²)"),
    "bias": ((False,), "no biases"),
    "qk_bias": ((False,), "no learned q/k biases"),
    "clip_qkv": ((None,), "no QKV clipping"),
    "logit_softcap": ((None,), "no logit softcapping"),
    "use_abacus": ((False,), "no abacus embeddings"),
    "mup_model_scaling_factor": ((1,), "no μP width scaling (it rescales widths and logits)"),
    # The embedding and logit scales come from the init strategy; 'scaled-zero' (every released model) has 1.
    "init_strategy": (("scaled-zero",), "init strategies whose embedding/logit scales are known to be 1"),
    "attn_impl": (("flash", "sdpa"), "causal softmax attention"),
    "use_fused_head": (("pytorch", "cce", "full-triton"), "an lm_head stored as a plain weight"),
    "injection_type": (("diagonal", "linear", "add"), "the three official injections"),
    "_class_name": (("ParcaeConfig",), "Parcae checkpoints (not GPT or other architectures)"),
    "model_class_name": (("Parcae",), "the Parcae model class"),
}

# Official fields that do not change the forward pass of a trained model (training, init, kernels, monitoring).
_NON_FORWARD_FIELDS = frozenset({
    "hf_config", "init_orthogonal", "skip_initialization", "debias_attention", "center_attention",
    "activation_checkpoint_impl", "simple_ops", "strategy", "sampling_scheme", "lockstep_n", "lockstep_k",
    "curriculum_target", "_is_recurrent_block_config", "architecture_class_name",
})  # fmt: skip

# Official state_init → ours. 'normal' (std 1), 'embed' and 'unit' have no equivalent; they need an explicit
# `state_init=` (parity with the official code is defined with a zero initial state).
_STATE_INITS = {"like-init": "like-init", "zero": "zero"}


@dataclass(frozen=True)
class OfficialLayout:
    """What an official config builds: shapes, the value-embedding tables and gates, and the RoPE table."""

    config: ParcaeConfig
    tables: frozenset[int]  # value_embeds.{i} that exist
    gates: frozenset[str]  # "prelude.j" / "core_block.j" / "coda.j" blocks that have an attn.ve_gate
    gate_n_layer: int  # the official n_layer = n_core · mean_backprop_depth that placed the gates
    rope_positions: int  # rows of freqs_cis
    rope_base: float
    tied_head_transposed: bool  # an untied lm_head stored [C, V] (use_fused_head 'full-triton')
    vocab_limit: int  # the unpadded vocabulary (ids ≥ this are padding rows)
    unknown_fields: tuple[str, ...] = ()  # config.json keys this converter does not know (reported)

    @property
    def used_layers(self) -> tuple[int, ...]:
        return tuple(sorted(i for i, block in enumerate(self.blocks()) if i in self.tables and block in self.gates))

    def blocks(self) -> list[str]:
        """Official block names in distinct-layer order (prelude, core, coda)."""
        cfg = self.config
        return (
            [f"prelude.{j}" for j in range(cfg.n_prelude)]
            + [f"core_block.{j}" for j in range(cfg.n_core)]
            + [f"coda.{j}" for j in range(cfg.n_coda)]
        )


@dataclass
class ConversionReport:
    """What a conversion did: the config it built, and the official tensors it dropped (with the reason)."""

    config: ParcaeConfig
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    vocab_limit: int | None = None  # the tokenizer's vocabulary when the embedding is padded beyond it

    def summary(self) -> str:
        cfg = self.config
        # Ask the config which layers use one: `value_embedding_layers` is None under the alternating rule
        # (the usual case for our own runs), so printing the field would claim there are none.
        layers = [i for i in range(cfg.n_layers) if cfg.has_value_embedding(i)]
        lines = [f"converted {cfg.name}: {cfg.n_prelude}/{cfg.n_core}/{cfg.n_coda} layers, d_model {cfg.d_model}, "
                 f"d_state {cfg.d_state}, value embeddings on layers {layers}"]  # fmt: skip
        lines += [f"dropped {key}: {reason}" for key, reason in self.dropped.items()]
        lines += self.notes
        return "\n".join(lines)


def _has_ve(layer: int, n_layer: int) -> bool:
    """nanochat's alternating rule (Python's % keeps it defined for n_layer = 0)."""
    return layer % 2 == (n_layer - 1) % 2


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def _int_field(cfg: dict[str, Any], name: str, minimum: int = 1) -> int:
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"official config field {name} must be an integer ≥ {minimum}, got {value!r}.")
    return value


def _positive_number(cfg: dict[str, Any], name: str) -> float:
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"official config field {name} must be a positive number, got {value!r}.")
    return float(value)


def official_layout(config_dict: dict[str, Any], *, state_init: str | None = None) -> OfficialLayout:
    """Read an official `config.json` dict: the matching ParcaeConfig and what the official model holds.

    `state_init` overrides the initial state ('zero', 'like-init' or 'normal'); by default the official one is
    kept when it has an equivalent here. An official config object (a dataclass) is accepted too.
    """
    if dataclasses.is_dataclass(config_dict) and not isinstance(config_dict, type):
        config_dict = {"_class_name": type(config_dict).__name__, **dataclasses.asdict(config_dict)}
    if not isinstance(config_dict, dict):
        raise ValueError(f"the official config must be a JSON object, got {type(config_dict).__name__}.")
    if "n_layers_in_recurrent_block" not in config_dict and "_class_name" not in config_dict:
        raise ValueError("this config.json is not an official Parcae config (no n_layers_in_recurrent_block).")
    cfg = {**_OFFICIAL_DEFAULTS, "_class_name": "ParcaeConfig", "model_class_name": "Parcae", **config_dict}
    if cfg["rope_settings"] is not None and not isinstance(cfg["rope_settings"], dict):
        raise ValueError(f"official config field rope_settings must be an object, got {cfg['rope_settings']!r}.")
    rope = {**_OFFICIAL_DEFAULTS["rope_settings"], **(cfg["rope_settings"] or {})}
    known = set(_OFFICIAL_DEFAULTS) | set(_SUPPORTED_VALUES) | _NON_FORWARD_FIELDS
    unknown = tuple(sorted(set(config_dict) - known))

    for name, (allowed, meaning) in _SUPPORTED_VALUES.items():
        if cfg[name] not in allowed:
            raise ValueError(
                f"unsupported official config: {name} = {cfg[name]!r} (this converter supports {meaning}: "
                f"{', '.join(repr(a) for a in allowed)})."
            )
    if "Gemma" in str(cfg["name"]):  # the official Norm adds a unit offset for configs named *Gemma*
        raise ValueError(f"unsupported official config: name {cfg['name']!r} selects the Gemma RMSNorm (1 + w).")
    if not rope["use_rope"] or rope["rope_condense_ratio"] != 1:
        raise ValueError(
            f"unsupported official config: rope_settings {rope} (this converter supports uncondensed RoPE only)."
        )

    d_model = _int_field(cfg, "n_embd")
    n_heads = _int_field(cfg, "num_attention_heads")
    n_kv_heads = n_heads if cfg["num_key_value_heads"] is None else _int_field(cfg, "num_key_value_heads")
    if d_model % n_heads or n_heads % n_kv_heads:
        raise ValueError(f"official config: n_embd {d_model}, {n_heads} heads and {n_kv_heads} kv heads do not divide.")
    head_dim = d_model // n_heads
    d_mlp = 4 * d_model if cfg["intermediate_size"] is None else _int_field(cfg, "intermediate_size")
    n_prelude = _int_field(cfg, "n_layers_in_prelude", 0)
    n_core = _int_field(cfg, "n_layers_in_recurrent_block")
    n_coda = _int_field(cfg, "n_layers_in_coda", 0)
    d_state = _int_field(cfg, "recurrent_embedding_dimension")
    core_heads = n_heads if cfg["recurrent_num_attention_heads"] is None else cfg["recurrent_num_attention_heads"]
    if isinstance(core_heads, bool) or not isinstance(core_heads, int) or core_heads < 1 or d_state % core_heads:
        raise ValueError(
            f"official config: recurrent_embedding_dimension {d_state} is not divisible by the core's head count "
            f"{core_heads!r} (recurrent_num_attention_heads; null means num_attention_heads)."
        )
    if d_state // core_heads != head_dim:
        raise ValueError(
            f"official config: core heads of width {d_state // core_heads} (recurrent_embedding_dimension "
            f"{d_state} / {core_heads} heads) cannot use the model's RoPE table of head width {head_dim}; "
            f"set recurrent_num_attention_heads to {d_state // head_dim}."
        )
    d_core_mlp = cfg["recurrent_intermediation_embedding_dimension"]
    d_core_mlp = 4 * d_state if d_core_mlp is None else _int_field(cfg, "recurrent_intermediation_embedding_dimension")
    mean_recurrence = _int_field(cfg, "mean_recurrence")
    backprop = _int_field(cfg, "mean_backprop_depth", 0)
    vocab = _int_field(cfg, "vocab_size")
    padded = cfg["padded_vocab_size"]
    padded = _find_multiple(vocab, _int_field(cfg, "padding_multiple")) if padded is None else padded
    if isinstance(padded, bool) or not isinstance(padded, int) or padded < 1:
        raise ValueError(f"official config field padded_vocab_size must be a positive integer, got {padded!r}.")
    block_size = _int_field(cfg, "block_size")
    rope_positions = cfg["randomize_positions_from"] or block_size
    rope_base, norm_eps = _positive_number(rope, "rope_base"), _positive_number(cfg, "norm_eps")

    official_init = cfg["state_init"]
    if state_init is None:
        if official_init not in _STATE_INITS:
            raise ValueError(
                f"official state_init {official_init!r} has no equivalent here; pass state_init='zero' "
                "(the parity setting), 'like-init' or 'normal' to choose the initial state."
            )
        state_init = _STATE_INITS[official_init]

    # Value embeddings: tables by distinct-layer index, gates by the official layer ids (see module docstring).
    n_effective = n_prelude + n_core + n_coda
    n_layer = n_core * backprop  # the official (bogus) n_layer that decides the gates
    tables = frozenset(i for i in range(n_effective) if _has_ve(i, n_effective))
    coda_offset = n_prelude + n_core * mean_recurrence
    gate_ids = (
        [(f"prelude.{j}", j) for j in range(n_prelude)]
        + [(f"core_block.{j}", n_prelude + j) for j in range(n_core)]
        + [(f"coda.{j}", coda_offset + j) for j in range(n_coda)]
    )
    gates = frozenset(block for block, layer_id in gate_ids if _has_ve(layer_id, n_layer))
    blocks = [block for block, _ in gate_ids]
    used = tuple(i for i, block in enumerate(blocks) if i in tables and block in gates)

    sampling = cfg["recurrent_iteration_method"]
    config = ParcaeConfig(
        vocab_size=padded,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_mlp=d_mlp,
        n_prelude=n_prelude,
        n_core=n_core,
        n_coda=n_coda,
        d_state=d_state,
        max_seq_len=block_size,
        injection=cfg["injection_type"],
        prelude_norm=bool(cfg["prelude_norm"]),
        mean_recurrence=mean_recurrence,
        backprop_depth=max(1, backprop),  # training only; the gate rule above uses the official value
        depth_sampling=sampling if sampling in ("per-sequence", "per-batch", "per-token") else "per-sequence",
        state_init=state_init,
        value_embeddings=bool(used),
        qk_norm=bool(cfg["qk_norm"]),
        mlp="relu2",
        tie_embeddings=bool(cfg["tie_embeddings"]),
        rope_base=rope_base,
        norm_eps=norm_eps,
        n_core_heads=core_heads,
        n_core_kv_heads=core_heads,  # the official core block forces kv heads = heads
        d_core_mlp=d_core_mlp,
        value_embedding_layers=used,
        name=str(cfg["name"] or "parcae-lm"),
    )
    return OfficialLayout(
        config=config,
        tables=tables,
        gates=gates,
        gate_n_layer=n_layer,
        rope_positions=rope_positions,
        rope_base=rope_base,
        tied_head_transposed=cfg["use_fused_head"] == "full-triton" and not cfg["tie_embeddings"],
        vocab_limit=min(vocab, padded),
        unknown_fields=unknown,
    )


# ---------------------------------------------------------------------- key mapping
_BLOCK_PARAMS = {  # official name inside a block → ours
    "norm_1.weight": "attn_norm.weight",
    "attn.c_q.weight": "attn.q_proj.weight",
    "attn.c_k.weight": "attn.k_proj.weight",
    "attn.c_v.weight": "attn.v_proj.weight",
    "attn.c_proj.weight": "attn.out_proj.weight",
    "norm_2.weight": "mlp_norm.weight",
    "mlp.fc.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}
_ROTATED = ("attn.c_q.weight", "attn.c_k.weight")  # rows permuted between the RoPE layouts
_INJECTION_PARAMS = {
    "diagonal": {"A_log": "A_log", "dt_bias": "dt_bias", "B": "B"},
    "linear": {"adapter.weight": "weight"},
    "add": {},
}
_OUR_PARTS = {"prelude": "prelude", "core_block": "core", "coda": "coda"}


def _key_map(layout: OfficialLayout) -> dict[str, str]:
    """Every official key that carries a parameter of our model → our key."""
    cfg = layout.config
    used = set(layout.used_layers)
    mapping = {
        "transformer.wte.weight": "embed.weight",
        "transformer.ln_f.weight": "final_norm.weight",
        "transformer.C.weight": "readout.weight",
    }
    if cfg.prelude_norm:
        mapping["transformer.ln_prelude.weight"] = "prelude_norm.weight"
    if not cfg.tie_embeddings:
        mapping["lm_head.weight"] = "lm_head.weight"
    for name, ours in _INJECTION_PARAMS[cfg.injection].items():
        mapping[f"transformer.adapter.{name}"] = f"injection.{ours}"
    for i, block in enumerate(layout.blocks()):
        part, index = block.split(".")
        ours = f"{_OUR_PARTS[part]}.{index}"
        for name, our_name in _BLOCK_PARAMS.items():
            mapping[f"transformer.{block}.{name}"] = f"{ours}.{our_name}"
        if i in used:
            mapping[f"transformer.{block}.attn.ve_gate.weight"] = f"{ours}.attn.ve_gate.weight"
            mapping[f"value_embeds.{i}.weight"] = f"value_embeds.{i}.weight"
    return mapping


def _ignored(layout: OfficialLayout) -> dict[str, str]:
    """Official keys that carry nothing our model needs, and why (the explicit ignore list)."""
    cfg = layout.config
    used = set(layout.used_layers)
    ignored = {"freqs_cis": "RoPE buffer, recomputed from rope_base (checked equal)"}
    if cfg.tie_embeddings:
        ignored["lm_head.weight"] = "tied to transformer.wte.weight (checked equal)"
    for i, block in enumerate(layout.blocks()):
        if i in used:
            continue
        if i in layout.tables:
            ignored[f"value_embeds.{i}.weight"] = (
                f"table without a gate on transformer.{block} (the official gate rule uses n_layer = "
                f"n_core·mean_backprop_depth = {layout.gate_n_layer}), never read by the official forward"
            )
        if block in layout.gates:
            ignored[f"transformer.{block}.attn.ve_gate.weight"] = (
                f"gate without a value_embeds.{i} table, never read by the official forward"
            )
    return ignored


def _rope_permutation(head_dim: int) -> Tensor:
    """Channel order that takes the interleaved layout to rotate-half: ours[i] = official[perm[i]]."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def interleaved_to_rotate_half(weight: Tensor, head_dim: int) -> Tensor:
    """Permute the output rows of a q/k projection [H·D, C] within each head (official → ours)."""
    rows = weight.shape[0]
    return weight.reshape(rows // head_dim, head_dim, -1)[:, _rope_permutation(head_dim)].reshape(weight.shape)


def rotate_half_to_interleaved(weight: Tensor, head_dim: int) -> Tensor:
    """The inverse of `interleaved_to_rotate_half` (ours → official)."""
    rows = weight.shape[0]
    inverse = torch.argsort(_rope_permutation(head_dim))
    return weight.reshape(rows // head_dim, head_dim, -1)[:, inverse].reshape(weight.shape)


def official_rope_table(positions: int, head_dim: int, base: float) -> Tensor:
    """The official `freqs_cis` buffer [1, positions, 1, D/2, 2] of (cos, sin) pairs."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None, :, None]


# ---------------------------------------------------------------------- conversion
def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop leading `module.` / `_orig_mod.` / `model.` from every key (as the official loader does)."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(STRIP_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise ValueError(f"state dict keys collide after stripping wrapper prefixes: {key!r} → {name!r}.")
        out[name] = value
    return out


def convert_state_dict(
    state_dict: dict[str, Any], config_dict: dict[str, Any], *, state_init: str | None = None
) -> tuple[ParcaeConfig, dict[str, Tensor], ConversionReport]:
    """Official (state_dict, config.json) → (our config, our state dict, report). Strict; see module docstring."""
    layout = official_layout(config_dict, state_init=state_init)
    cfg = layout.config
    state = strip_prefixes(state_dict)
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise ValueError(f"the checkpoint holds non-tensor entries: {_names(not_tensors)}.")

    mapping, ignored = _key_map(layout), _ignored(layout)
    optional = {"freqs_cis", "lm_head.weight"} | {k for k in ignored if "value_embeds" in k or "ve_gate" in k}
    missing = sorted(k for k in mapping if k not in state)
    unexpected = sorted(k for k in state if k not in mapping and k not in ignored)
    missing += sorted(k for k in ignored if k not in state and k not in optional)
    if missing or unexpected:
        parts = [f"missing {_names(missing)}"] if missing else []
        parts += [f"unexpected {_names(unexpected)}"] if unexpected else []
        hint = " (is this a Parcae checkpoint, and the config.json that belongs to it?)"
        raise ValueError(f"official checkpoint does not match its config: {'; '.join(parts)}{hint}")

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Parcae(cfg).state_dict().items()}
    converted: dict[str, Tensor] = {}
    wrong: list[str] = []
    for key, ours in mapping.items():
        tensor = state[key]
        if key == "lm_head.weight" and layout.tied_head_transposed:
            tensor = tensor.t()
        if tuple(tensor.shape) != expected[ours]:
            wrong.append(f"{key} {tuple(tensor.shape)} ≠ {expected[ours]}")
            continue
        if key.endswith(_ROTATED):
            tensor = interleaved_to_rotate_half(tensor, cfg.head_dim)
        converted[ours] = tensor
    if wrong:
        raise ValueError(f"official checkpoint has wrong shapes for its config: {_names(wrong)}.")
    uncovered = sorted(set(expected) - set(converted) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if uncovered:  # a parameter of our model that no official tensor fills: a bug in the mapping, never silent
        raise ValueError(f"conversion leaves parameters unfilled: {_names(uncovered)}.")

    _check_rope(state.get("freqs_cis"), layout)
    head = state.get("lm_head.weight")
    if cfg.tie_embeddings and head is not None and not _same(head, state["transformer.wte.weight"]):
        raise ValueError("lm_head.weight differs from transformer.wte.weight although tie_embeddings is true.")
    report = ConversionReport(config=cfg, dropped={k: v for k, v in ignored.items() if k in state})
    if layout.unknown_fields:
        report.notes.append(f"ignored config fields unknown to this converter: {', '.join(layout.unknown_fields)}")
    if layout.vocab_limit < cfg.vocab_size:
        report.vocab_limit = layout.vocab_limit
        report.notes.append(f"vocabulary padded from {layout.vocab_limit} to {cfg.vocab_size} rows")
    return cfg, converted, report


def _same(a: Tensor, b: Tensor) -> bool:
    if a.is_meta or b.is_meta:
        return a.shape == b.shape
    return a.shape == b.shape and torch.equal(a, b)


def _check_rope(freqs_cis: Tensor | None, layout: OfficialLayout) -> None:
    cfg = layout.config
    if freqs_cis is None:
        return
    shape = (1, layout.rope_positions, 1, cfg.head_dim // 2, 2)
    if tuple(freqs_cis.shape) != shape:
        raise ValueError(
            f"freqs_cis has shape {tuple(freqs_cis.shape)}, but block_size/randomize_positions_from and head_dim "
            f"give {shape}: the config.json does not belong to these weights."
        )
    if freqs_cis.is_meta:
        return
    expected = official_rope_table(layout.rope_positions, cfg.head_dim, layout.rope_base)
    # Tolerance: cos/sin of angles up to ~block_size rad differ by ~1e-6 between math libraries (more if the
    # buffer was cast to 16 bits); another base differs by ≥ 0.1 within a few dozen positions.
    tolerance = max(1e-3, 4 * torch.finfo(freqs_cis.dtype).eps) if freqs_cis.is_floating_point() else 1e-3
    error = (freqs_cis.float() - expected).abs().max().item()
    if error > tolerance:
        raise ValueError(
            f"freqs_cis does not match rope_base {layout.rope_base:g} (max |Δ| {error:.2g}): the config.json's "
            "rope_settings do not belong to these weights."
        )


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def from_parcae_lm(
    state_dict: dict[str, Any],
    config_dict: dict[str, Any],
    *,
    state_init: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Parcae:
    """A Parcae (in eval mode) with the weights of an official checkpoint; logits match the official model's.

    `state_init`: the initial loop state ('zero' for parity runs; by default the official setting).
    Raises ValueError (nothing half-loaded) when the checkpoint and config do not match or use features that
    this model does not implement.
    """
    model, _ = from_parcae_lm_with_report(state_dict, config_dict, state_init=state_init, device=device, dtype=dtype)
    return model


def from_parcae_lm_with_report(
    state_dict: dict[str, Any],
    config_dict: dict[str, Any],
    *,
    state_init: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Parcae, ConversionReport]:
    """`from_parcae_lm`, plus the report of what was dropped."""
    cfg, state, report = convert_state_dict(state_dict, config_dict, state_init=state_init)
    with torch.device("meta"):
        model = Parcae(cfg)
    model.load_weights(state, device=device)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), report


# ---------------------------------------------------------------------- export (round trips, tests)
def to_parcae_lm(model: Parcae) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Our model → (official state_dict, official config.json dict). Works on the meta device.

    Only models the official code can express are exported: ReLU² MLPs, Euler-diagonal/linear/add injection,
    no GQA in the core, and value embeddings exactly where the official rules put both tables and gates.
    """
    cfg = model.config
    problems = []
    if not cfg.is_looped:
        problems.append("n_core = 0 (the official Parcae always has a core)")
    if cfg.mlp != "relu2":
        problems.append(f"mlp {cfg.mlp!r}")
    if cfg.injection == "diagonal-zoh":
        problems.append("injection 'diagonal-zoh'")
    if cfg.is_looped and cfg.core_kv_heads != cfg.core_heads:
        problems.append("GQA in the core")
    if cfg.state_init not in _STATE_INITS.values():
        problems.append(f"state_init {cfg.state_init!r}")
    if problems:
        raise ValueError(f"the official format cannot express this model: {', '.join(problems)}.")
    config_dict = _official_config(cfg)
    layout = official_layout(config_dict)
    ours = {i for i in range(cfg.n_layers) if cfg.has_value_embedding(i)}
    gate_layers = {i for i, block in enumerate(layout.blocks()) if block in layout.gates}
    if ours != set(layout.tables) or ours != gate_layers:
        raise ValueError(
            f"the official format puts value-embedding tables on layers {sorted(layout.tables)} and gates on "
            f"{sorted(gate_layers)} for this shape; this model has them on {sorted(ours)}."
        )
    state = model.state_dict()
    official: dict[str, Tensor] = {}
    for key, our_key in _key_map(layout).items():
        tensor = state[our_key].detach()
        if key.endswith(_ROTATED):
            tensor = rotate_half_to_interleaved(tensor, cfg.head_dim)
        official[key] = tensor
    official["lm_head.weight"] = state["lm_head.weight"].detach()  # the official model saves the tied head too
    device = state["embed.weight"].device
    official["freqs_cis"] = (
        torch.empty((1, cfg.max_seq_len, 1, cfg.head_dim // 2, 2), device="meta")
        if device.type == "meta"
        else official_rope_table(cfg.max_seq_len, cfg.head_dim, cfg.rope_base).to(device)
    )
    return official, config_dict


def _official_config(cfg: ParcaeConfig) -> dict[str, Any]:
    """The official config.json for our config (the fields the official save_pretrained writes)."""
    rope_base = int(cfg.rope_base) if float(cfg.rope_base).is_integer() else cfg.rope_base
    return {
        "name": cfg.name,
        "hf_config": {"org": "", "name": cfg.name},
        "block_size": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "padding_multiple": 64,
        "padded_vocab_size": cfg.vocab_size,
        "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": rope_base},
        "use_abacus": False,
        "randomize_positions_from": None,
        "block_class_name": "TransformerPreNormBlock",
        "norm_class_name": "RMSNorm",
        "attn_impl": "flash",
        "norm_eps": cfg.norm_eps,
        "mlp_class_name": "BaseMLP",
        "nonlin_name": "ReLU2",
        "bias": False,
        "qk_bias": False,
        "init_strategy": "scaled-zero",
        "init_orthogonal": True,
        "skip_initialization": False,
        "mup_model_scaling_factor": 1,
        "use_fused_head": "pytorch",
        "debias_attention": False,
        "center_attention": False,
        "clip_qkv": None,
        "qk_norm": cfg.qk_norm,
        "logit_softcap": None,
        "activation_checkpoint_impl": "per-iteration",
        "simple_ops": False,
        "strategy": "single",
        "injection_type": cfg.injection,
        "n_layers_in_recurrent_block": cfg.n_core,
        "n_layers_in_prelude": cfg.n_prelude,
        "n_layers_in_coda": cfg.n_coda,
        "state_init": cfg.state_init,
        "recurrent_embedding_dimension": cfg.d_state,
        "recurrent_intermediation_embedding_dimension": cfg.core_d_mlp,
        "recurrent_num_attention_heads": cfg.core_heads,
        "prelude_norm": cfg.prelude_norm,
        "sampling_scheme": "poisson-truncated-full",
        "mean_recurrence": cfg.mean_recurrence,
        "mean_backprop_depth": cfg.backprop_depth,
        "lockstep_n": False,
        "lockstep_k": False,
        "curriculum_target": "forward",
        "recurrent_iteration_method": cfg.depth_sampling if cfg.depth_sampling != "fixed" else "per-sequence",
        "tie_embeddings": cfg.tie_embeddings,
        "model_class_name": "Parcae",
        "_is_recurrent_block_config": False,
        "_class_name": "ParcaeConfig",
    }


# ---------------------------------------------------------------------- files
def read_parcae_lm(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state_dict, config dict) of an official checkpoint directory: config.json plus model.safetensors
    (or shards `*.safetensors`), pytorch_model.bin or model.pt. Pickles are read with weights_only=True."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (expected an official checkpoint directory).")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found (an official checkpoint directory has a config.json).")
    try:
        config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return _read_safetensors(shards), config_dict
    for name in OFFICIAL_WEIGHT_FILES[1:]:
        if (directory / name).is_file():
            return read_torch_weights(directory / name), config_dict
    raise FileNotFoundError(f"{directory} has no weights ({', '.join(OFFICIAL_WEIGHT_FILES)} or *.safetensors).")


def _read_safetensors(paths: list[Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in paths:
        try:
            part = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read {path}: {err}") from None
        clash = sorted(set(part) & set(state))
        if clash:
            raise ValueError(f"{path} repeats tensors of another shard: {_names(clash)}.")
        state.update(part)
    return state


def read_torch_weights(path: str | Path) -> dict[str, Tensor]:
    """A `torch.save`d state dict, loaded with weights_only=True (never arbitrary pickled code)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a weights-only checkpoint (loading it would run pickled code, which is refused): "
            f"{str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"cannot read {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    for wrapper in ("state_dict", "model"):  # training checkpoints often nest the weights one level down
        if isinstance(obj, dict) and len(obj) and isinstance(obj.get(wrapper), dict) and not _is_state(obj):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not _is_state(obj):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors).")
    return obj


def _is_state(obj: dict[Any, Any]) -> bool:
    return all(isinstance(k, str) for k in obj) and any(isinstance(v, Tensor) for v in obj.values())


def is_parcae_lm_directory(directory: str | Path) -> bool:
    """True when `directory/config.json` is an official parcae-lm config (rather than one of ours)."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "n_layers_in_recurrent_block" in data


def load_parcae_lm(
    directory: str | Path, *, state_init: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Parcae, ConversionReport]:
    """Read and convert an official checkpoint directory."""
    state, config_dict = read_parcae_lm(directory)
    return from_parcae_lm_with_report(state, config_dict, state_init=state_init, device=device)


# ---------------------------------------------------------------------- Hugging Face directory layout
HF_MODEL_TYPE = "parcae"
HF_ARCHITECTURE = "ParcaeForCausalLM"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_GENERATION_CONFIG = "generation_config.json"


def hf_config_dict(config: ParcaeConfig, **extra: Any) -> dict[str, Any]:
    """config.json of a directory both loaders read: our fields plus transformers' `model_type`."""
    return {**config.to_dict(), "model_type": HF_MODEL_TYPE, "architectures": [HF_ARCHITECTURE], **extra}


def write_hf_config(directory: str | Path, config: ParcaeConfig, **extra: Any) -> None:
    path = Path(directory) / CONFIG_FILE
    path.write_text(json.dumps(hf_config_dict(config, **extra), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_generation_config(directory: str | Path, **settings: Any) -> None:
    """generation_config.json: transformers' sampling defaults plus ours (`num_steps`, `vocab_limit`)."""
    values = {k: v for k, v in settings.items() if v is not None}
    path = Path(directory) / HF_GENERATION_CONFIG
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def byte_level_tokenizer_json() -> str:
    """Our byte tokenizer as a Hugging Face tokenizer.json: a byte-level BPE without merges, so id b is byte b
    and 256/257/258 are <|bos|>/<|eos|>/<|pad|> — the same ids for every valid Unicode text."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from ..data.tokenizer import SPECIALS

    alphabet = _byte_symbols()
    hf = HFTokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(SPECIALS))
    return hf.to_str(pretty=True)


def _byte_symbols() -> list[str]:
    """The printable symbol GPT-2's byte-level alphabet assigns to each byte 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def save_hf_tokenizer(
    tokenizer: Any, directory: str | Path, *, model_max_length: int, source: Path | None = None
) -> None:
    """Write tokenizer.json + tokenizer_config.json so `AutoTokenizer` returns a `PreTrainedTokenizerFast`.

    A BPE tokenizer's tokenizer.json is copied byte for byte from `source` (or saved); the byte tokenizer is
    written as the equivalent byte-level BPE (`byte_level_tokenizer_json`), which our own loader reads back as
    a BPE tokenizer with the same ids. No BOS is added automatically: prepend `bos_token_id` as Parcae's data
    pipeline and `parcae generate` do.
    """
    from ..data.tokenizer import BOS, EOS, PAD, TOKENIZER_FILE

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / TOKENIZER_FILE
    if tokenizer.kind == "byte":
        target.write_text(byte_level_tokenizer_json(), encoding="utf-8")
    elif source is not None and source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    elif source is None:
        tokenizer.save(directory)
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        # A literal "<|bos|>" in a text is ordinary text, as in our tokenizers (parcae.data.tokenizer).
        "split_special_tokens": True,
    }
    (directory / HF_TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def write_hf_directory(
    model: Parcae,
    directory: str | Path,
    *,
    tokenizer: Any | None = None,
    tokenizer_source: Path | None = None,
    vocab_limit: int | None = None,
    stop_id: int | None = None,
) -> Path:
    """Save `model` so that `Parcae.from_pretrained`, `parcae eval/generate` and, with transformers installed,
    `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` all load the directory."""
    directory = Path(directory)
    model.save_pretrained(directory)
    write_hf_config(directory, model.config)
    bos = pad = None
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, directory, model_max_length=model.config.max_seq_len, source=tokenizer_source)
        bos, pad = tokenizer.bos_id, tokenizer.pad_id
        vocab_limit = min(vocab_limit or tokenizer.vocab_size, tokenizer.vocab_size)
    if vocab_limit is not None and vocab_limit >= model.config.vocab_size:
        vocab_limit = None
    write_generation_config(
        directory, bos_token_id=bos, eos_token_id=stop_id, pad_token_id=pad, vocab_limit=vocab_limit,
        num_steps=model.config.mean_recurrence if model.config.is_looped else None,
    )  # fmt: skip
    return directory


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    kind: str = "parcae-lm",
    state_init: str | None = None,
    tokenizer: bool = True,
) -> ConversionReport:
    """`parcae convert`: an official checkpoint (kind 'parcae-lm') or one of our runs / saved models (kind
    'run') → a model directory for our loaders and transformers. `destination` must not exist or be empty."""
    from ..data.tokenizer import TOKENIZER_FILE, load_tokenizer

    source, destination = Path(source), Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise FileExistsError(f"{destination} already exists and is not empty; choose a new output directory.")
    if kind == "parcae-lm":
        model, report = load_parcae_lm(source, state_init=state_init)
        tok_file = source / TOKENIZER_FILE
        tok = None
        if tokenizer and tok_file.is_file():
            try:
                tok = load_tokenizer(tok_file)
            except ValueError as err:
                raise ValueError(f"{err} (pass --no-tokenizer to convert the weights without it)") from None
        vocab_limit = report.vocab_limit
        stop_id = None  # the official models have no end-of-text convention (their generate never stops early)
    elif kind == "run":
        from ..train.run import open_run

        run = open_run(source)
        model = run.model
        if state_init is not None:
            model = _with_state_init(model, state_init)
        report = ConversionReport(config=model.config)
        tok = run.tokenizer if tokenizer else None
        tok_file = run.path / TOKENIZER_FILE
        vocab_limit, stop_id = None, (tok.bos_id if tok is not None else None)  # documents start with BOS
    else:
        raise ValueError(f"unknown source kind {kind!r}; choose 'parcae-lm' or 'run'.")
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer in {source} ({tok.vocab_size} ids) does not fit the model "
                         f"({model.config.vocab_size} rows); pass --no-tokenizer.")  # fmt: skip
    destination.mkdir(parents=True, exist_ok=True)
    source_file = tok_file if tok is not None and tok.kind != "byte" else None
    write_hf_directory(
        model, destination, tokenizer=tok, tokenizer_source=source_file, vocab_limit=vocab_limit, stop_id=stop_id
    )
    if tok is None and tokenizer and kind == "parcae-lm":
        report.notes.append(f"no {TOKENIZER_FILE} in {source}: the output has no tokenizer")
    return report


def _with_state_init(model: Parcae, state_init: str) -> Parcae:
    """The same weights under a config whose initial state differs (configs are frozen)."""
    config = model.config.replace(state_init=state_init)
    with torch.device("meta"):
        clone = Parcae(config)
    clone.load_weights(model.state_dict(), device=next(model.parameters()).device)
    return clone.eval()


def parameter_count(state_dict: dict[str, Tensor], config_dict: dict[str, Any]) -> int:
    """Unique parameters of an official state dict (the tied head and the RoPE buffer not counted)."""
    skip = {"freqs_cis"} | ({"lm_head.weight"} if config_dict.get("tie_embeddings") else set())
    return sum(math.prod(t.shape) for k, t in strip_prefixes(state_dict).items() if k not in skip)
