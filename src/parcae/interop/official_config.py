"""Official `config.json` ⇄ `ParcaeConfig` (docs/official-format.md), and where value-embedding tables/gates sit."""

import dataclasses
from typing import Any

from ..model.config import ParcaeConfig

# Official fields in save_pretrained's order → default (forward-neutral ones: what official_config_dict writes)
_OFFICIAL_FIELDS: dict[str, Any] = {
    "name": "", "hf_config": {"org": "", "name": ""}, "block_size": 4096, "n_embd": 4096, "intermediate_size": None,
    "num_attention_heads": 32, "num_key_value_heads": None, "vocab_size": 50254, "padding_multiple": 512,
    "padded_vocab_size": None, "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50_000},
    "use_abacus": False, "randomize_positions_from": None, "block_class_name": "TransformerPreNormBlock",
    "norm_class_name": "LayerNorm", "attn_impl": "flash", "norm_eps": 1e-5, "mlp_class_name": "BaseMLP",
    "nonlin_name": "GELU", "bias": False, "qk_bias": False, "init_strategy": "scaled", "init_orthogonal": True,
    "skip_initialization": False, "mup_model_scaling_factor": 1, "use_fused_head": "pytorch",
    "debias_attention": False, "center_attention": False, "clip_qkv": None, "qk_norm": False, "logit_softcap": None,
    "activation_checkpoint_impl": "per-iteration", "simple_ops": False, "strategy": "single",
    "injection_type": "diagonal", "n_layers_in_recurrent_block": 4, "n_layers_in_prelude": 1, "n_layers_in_coda": 1,
    "state_init": "like-init", "recurrent_embedding_dimension": 1024,
    "recurrent_intermediation_embedding_dimension": 3520, "recurrent_num_attention_heads": None,
    "prelude_norm": False, "sampling_scheme": "poisson-truncated-full", "mean_recurrence": 32,
    "mean_backprop_depth": 8, "lockstep_n": False, "lockstep_k": False, "curriculum_target": "forward",
    "recurrent_iteration_method": "per-batch", "tie_embeddings": False, "model_class_name": "Parcae",
    "_is_recurrent_block_config": False, "_class_name": "ParcaeConfig",
}  # fmt: skip
_KNOWN_FIELDS = {*_OFFICIAL_FIELDS, "architecture_class_name"}  # the last one is not saved and changes nothing

_SUPPORTED_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {  # field → (the values we implement, meaning)
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
    "init_strategy": (("scaled-zero",), "the init whose embedding/logit scales are 1 (every released model's)"),
    "attn_impl": (("flash", "sdpa"), "causal softmax attention"),
    "use_fused_head": (("pytorch", "cce", "full-triton"), "an lm_head stored as a plain weight"),
    "injection_type": (("diagonal", "linear", "add"), "the three official injections"),
    "_class_name": (("ParcaeConfig",), "Parcae checkpoints (not GPT or other architectures)"),
    "model_class_name": (("Parcae",), "the Parcae model class"),
}

OFFICIAL_STATE_INITS = {"like-init": "like-init", "zero": "zero"}  # official → ours ('normal', 'embed', 'unit': none)


@dataclasses.dataclass(frozen=True)
class OfficialLayout:
    """What an official config builds: our config, the value-embedding tables and gates, and the RoPE table."""

    config: ParcaeConfig  # its value_embedding_layers: the layers with both a table and a gate
    blocks: tuple[str, ...]  # official block names in distinct-layer order: prelude.j, core_block.j, coda.j
    tables: frozenset[int]  # value_embeds.{i} that exist
    gates: frozenset[str]  # blocks that have an attn.ve_gate
    gate_n_layer: int  # the official n_layer = n_core · mean_backprop_depth that placed the gates
    rope_positions: int  # rows of freqs_cis
    tied_head_transposed: bool  # an untied lm_head stored [C, V] (use_fused_head 'full-triton')
    vocab_limit: int  # the unpadded vocabulary (ids ≥ this are padding rows)
    unknown_fields: tuple[str, ...] = ()  # config.json keys this converter does not know (reported)


def _int_field(cfg: dict[str, Any], name: str, minimum: int = 1, *, default: int | None = None) -> int:
    value = cfg[name]
    if value is None and default is not None:  # the official null: a width derived from another field
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"official config field {name} must be an integer ≥ {minimum}, got {value!r}.")
    return value


def official_layout(config_dict: dict[str, Any], *, state_init: str | None = None) -> OfficialLayout:
    """An official config.json dict (or config dataclass) → our config and its layout; `state_init` overrides h₀'s."""
    if dataclasses.is_dataclass(config_dict) and not isinstance(config_dict, type):
        config_dict = {"_class_name": type(config_dict).__name__, **dataclasses.asdict(config_dict)}
    if not isinstance(config_dict, dict):
        raise ValueError(f"the official config must be a JSON object, got {type(config_dict).__name__}.")
    if "n_layers_in_recurrent_block" not in config_dict and "_class_name" not in config_dict:
        raise ValueError("this config.json is not an official Parcae config (no n_layers_in_recurrent_block).")
    cfg = {**_OFFICIAL_FIELDS, **config_dict}
    if cfg["rope_settings"] is not None and not isinstance(cfg["rope_settings"], dict):
        raise ValueError(f"official config field rope_settings must be an object, got {cfg['rope_settings']!r}.")
    rope = {**_OFFICIAL_FIELDS["rope_settings"], **(cfg["rope_settings"] or {})}
    for name, (allowed, meaning) in _SUPPORTED_VALUES.items():
        if cfg[name] not in allowed:
            detail = f"this converter supports {meaning}: {', '.join(repr(a) for a in allowed)}"
            raise ValueError(f"unsupported official config: {name} = {cfg[name]!r} ({detail}).")
    if "Gemma" in str(cfg["name"]):  # the official Norm adds a unit offset for configs named *Gemma*
        raise ValueError(f"unsupported official config: name {cfg['name']!r} selects the Gemma RMSNorm (1 + w).")
    if not rope["use_rope"] or rope["rope_condense_ratio"] != 1:
        raise ValueError(f"unsupported official config: rope_settings {rope} (only uncondensed RoPE is supported).")
    d_model, n_heads = _int_field(cfg, "n_embd"), _int_field(cfg, "num_attention_heads")
    n_kv_heads = _int_field(cfg, "num_key_value_heads", default=n_heads)
    if d_model % n_heads or n_heads % n_kv_heads:
        raise ValueError(f"official config: n_embd {d_model}, {n_heads} heads and {n_kv_heads} kv heads do not divide.")
    head_dim, d_mlp = d_model // n_heads, _int_field(cfg, "intermediate_size", default=4 * d_model)
    n_prelude, n_core = _int_field(cfg, "n_layers_in_prelude", 0), _int_field(cfg, "n_layers_in_recurrent_block")
    n_coda, d_state = _int_field(cfg, "n_layers_in_coda", 0), _int_field(cfg, "recurrent_embedding_dimension")
    core_heads = _int_field(cfg, "recurrent_num_attention_heads", default=n_heads)
    if d_state != core_heads * head_dim:  # the core shares the model's RoPE table, so its heads have head_dim
        fix = f"; set recurrent_num_attention_heads to {d_state // head_dim}" if d_state % head_dim == 0 else ""
        heads = f"{core_heads} heads (recurrent_num_attention_heads; null: num_attention_heads) of width {head_dim}"
        raise ValueError(f"official config: recurrent_embedding_dimension {d_state} is not {heads}{fix}.")
    d_core_mlp = _int_field(cfg, "recurrent_intermediation_embedding_dimension", default=4 * d_state)
    mean_recurrence, backprop = _int_field(cfg, "mean_recurrence"), _int_field(cfg, "mean_backprop_depth", 0)
    vocab = _int_field(cfg, "vocab_size")
    if cfg["padded_vocab_size"] is None:  # the official find_multiple: vocab_size rounded up to padding_multiple
        cfg["padded_vocab_size"] = vocab + -vocab % _int_field(cfg, "padding_multiple")
    padded, block_size = _int_field(cfg, "padded_vocab_size"), _int_field(cfg, "block_size")
    for name, value in (("rope_base", rope["rope_base"]), ("norm_eps", cfg["norm_eps"])):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"official config field {name} must be a positive number, got {value!r}.")
    if state_init is None and cfg["state_init"] not in OFFICIAL_STATE_INITS:
        choose = "pass state_init='zero' (the parity setting), 'like-init' or 'normal' to choose the initial state"
        raise ValueError(f"official state_init {cfg['state_init']!r} has no equivalent here; {choose}.")
    n_layer = n_core * backprop  # the official (bogus) n_layer that decides the gates
    layer_ids = {f"prelude.{j}": j for j in range(n_prelude)}
    layer_ids |= {f"core_block.{j}": n_prelude + j for j in range(n_core)}
    layer_ids |= {f"coda.{j}": n_prelude + n_core * mean_recurrence + j for j in range(n_coda)}
    # nanochat's alternating has_ve(i, L): i % 2 == (L - 1) % 2 (Python's % keeps it defined for L = 0)
    tables = frozenset(i for i in range(len(layer_ids)) if i % 2 == (len(layer_ids) - 1) % 2)
    gates = frozenset(block for block, layer_id in layer_ids.items() if layer_id % 2 == (n_layer - 1) % 2)
    used = tuple(i for i, block in enumerate(layer_ids) if i in tables and block in gates)
    sampling = cfg["recurrent_iteration_method"]
    config = ParcaeConfig(
        vocab_size=padded, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, d_mlp=d_mlp,
        n_prelude=n_prelude, n_core=n_core, n_coda=n_coda, d_state=d_state, max_seq_len=block_size,
        injection=cfg["injection_type"], prelude_norm=bool(cfg["prelude_norm"]), mean_recurrence=mean_recurrence,
        backprop_depth=max(1, backprop),  # training only; the gate rule above uses the official value
        depth_sampling=sampling if sampling in ("per-sequence", "per-batch", "per-token") else "per-sequence",
        state_init=OFFICIAL_STATE_INITS[cfg["state_init"]] if state_init is None else state_init,
        value_embeddings=bool(used), qk_norm=bool(cfg["qk_norm"]), mlp="relu2",
        tie_embeddings=bool(cfg["tie_embeddings"]), rope_base=float(rope["rope_base"]), norm_eps=float(cfg["norm_eps"]),
        n_core_heads=core_heads, n_core_kv_heads=core_heads,  # the official core block forces kv heads = heads
        d_core_mlp=d_core_mlp, value_embedding_layers=used, name=str(cfg["name"] or "parcae-lm"),
    )  # fmt: skip
    return OfficialLayout(
        config=config,
        blocks=tuple(layer_ids),
        tables=tables,
        gates=gates,
        gate_n_layer=n_layer,
        rope_positions=cfg["randomize_positions_from"] or block_size,
        tied_head_transposed=cfg["use_fused_head"] == "full-triton" and not cfg["tie_embeddings"],
        vocab_limit=min(vocab, padded),
        unknown_fields=tuple(sorted(set(config_dict) - _KNOWN_FIELDS)),
    )


def official_config_dict(cfg: ParcaeConfig) -> dict[str, Any]:
    """The official config.json for our config: every field the official save_pretrained writes, in its order."""
    rope_base = int(cfg.rope_base) if float(cfg.rope_base).is_integer() else cfg.rope_base
    return _OFFICIAL_FIELDS | {
        "name": cfg.name, "hf_config": {"org": "", "name": cfg.name}, "block_size": cfg.max_seq_len,
        "n_embd": cfg.d_model, "intermediate_size": cfg.d_mlp, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size, "padding_multiple": 64,
        "padded_vocab_size": cfg.vocab_size,
        "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": rope_base},
        "norm_class_name": "RMSNorm", "norm_eps": cfg.norm_eps, "nonlin_name": "ReLU2", "init_strategy": "scaled-zero",
        "qk_norm": cfg.qk_norm, "injection_type": cfg.injection, "n_layers_in_recurrent_block": cfg.n_core,
        "n_layers_in_prelude": cfg.n_prelude, "n_layers_in_coda": cfg.n_coda, "state_init": cfg.state_init,
        "recurrent_embedding_dimension": cfg.d_state, "recurrent_intermediation_embedding_dimension": cfg.core_d_mlp,
        "recurrent_num_attention_heads": cfg.core_heads, "prelude_norm": cfg.prelude_norm,
        "mean_recurrence": cfg.mean_recurrence, "mean_backprop_depth": cfg.backprop_depth,
        "recurrent_iteration_method": cfg.depth_sampling if cfg.depth_sampling != "fixed" else "per-sequence",
        "tie_embeddings": cfg.tie_embeddings,
    }  # fmt: skip
