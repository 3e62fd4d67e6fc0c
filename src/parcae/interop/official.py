"""Official `parcae-lm` checkpoints ⇄ Parcae models: the exact, strict state-dict mapping (docs/official-format.md)."""

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..model.config import ParcaeConfig
from ..model.parcae import Parcae
from .official_config import OFFICIAL_STATE_INITS, OfficialLayout, official_config_dict, official_layout

STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")  # wrapper prefixes, stripped as the official loader does


@dataclass
class ConversionReport:
    """What a conversion did: the config it built, and the official tensors it dropped (with the reason)."""

    config: ParcaeConfig
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    vocab_limit: int | None = None  # the tokenizer's vocabulary when the embedding is padded beyond it

    def summary(self) -> str:
        cfg = self.config
        # Not `value_embedding_layers`: it is None under the alternating rule, which would read as "none".
        layers = [i for i in range(cfg.n_layers) if cfg.has_value_embedding(i)]
        shape = f"{cfg.n_prelude}/{cfg.n_core}/{cfg.n_coda} layers, d_model {cfg.d_model}, d_state {cfg.d_state}"
        lines = [f"converted {cfg.name}: {shape}, value embeddings on layers {layers}"]
        lines += [f"dropped {key}: {reason}" for key, reason in self.dropped.items()]
        return "\n".join(lines + self.notes)


# Official name inside a block → ours.
_BLOCK_PARAMS = {"norm_1.weight": "attn_norm.weight"} | {f"attn.c_{x}.weight": f"attn.{x}_proj.weight" for x in "qkv"}
_BLOCK_PARAMS |= {"attn.c_proj.weight": "attn.out_proj.weight", "norm_2.weight": "mlp_norm.weight"}
_BLOCK_PARAMS |= {"mlp.fc.weight": "mlp.up_proj.weight", "mlp.proj.weight": "mlp.down_proj.weight"}
_ROTATED = ("attn.c_q.weight", "attn.c_k.weight")  # rows permuted between the RoPE layouts
_INJECTION_PARAMS = {"diagonal": ("A_log", "dt_bias", "B"), "linear": ("adapter.weight",), "add": ()}


def _key_map(layout: OfficialLayout) -> tuple[dict[str, str], dict[str, str]]:
    """(official key → our key for every parameter of our model, official keys our model does not need → why)."""
    cfg = layout.config
    mapping = {"transformer.wte.weight": "embed.weight", "transformer.ln_f.weight": "final_norm.weight"}
    mapping["transformer.C.weight"] = "readout.weight"
    ignored = {"freqs_cis": "RoPE buffer, recomputed from rope_base (checked equal)"}
    if cfg.prelude_norm:
        mapping["transformer.ln_prelude.weight"] = "prelude_norm.weight"
    if cfg.tie_embeddings:
        ignored["lm_head.weight"] = "tied to transformer.wte.weight (checked equal)"
    else:
        mapping["lm_head.weight"] = "lm_head.weight"
    for name in _INJECTION_PARAMS[cfg.injection]:
        mapping[f"transformer.adapter.{name}"] = f"injection.{name.removeprefix('adapter.')}"
    unread = "never read by the official forward"
    rule = f"the official gate rule uses n_layer = n_core·mean_backprop_depth = {layout.gate_n_layer}"
    for i, block in enumerate(layout.blocks):
        ours = block.replace("core_block.", "core.")  # prelude.j and coda.j keep their names
        mapping |= {f"transformer.{block}.{name}": f"{ours}.{our_name}" for name, our_name in _BLOCK_PARAMS.items()}
        if i in (cfg.value_embedding_layers or ()):
            mapping[f"transformer.{block}.attn.ve_gate.weight"] = f"{ours}.attn.ve_gate.weight"
            mapping[f"value_embeds.{i}.weight"] = f"value_embeds.{i}.weight"
            continue
        if i in layout.tables:
            ignored[f"value_embeds.{i}.weight"] = f"table without a gate on transformer.{block} ({rule}), {unread}"
        if block in layout.gates:
            ignored[f"transformer.{block}.attn.ve_gate.weight"] = f"gate without a value_embeds.{i} table, {unread}"
    return mapping, ignored


def interleaved_to_rotate_half(weight: Tensor, head_dim: int, *, inverse: bool = False) -> Tensor:
    """Permute each head's rows of a q/k projection [H·D, C] from official RoPE pairs (2i, 2i+1) to ours (i, i + D/2)
    (`inverse`: back). Exact, since q·k and the parameter-free QK-norm are sums over channels."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    order = torch.argsort(order) if inverse else order
    return weight.reshape(weight.shape[0] // head_dim, head_dim, -1)[:, order].reshape(weight.shape)


def official_rope_table(positions: int, head_dim: int, base: float) -> Tensor:
    """The official `freqs_cis` buffer [1, positions, 1, D/2, 2] of (cos, sin) pairs."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None, :, None]


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
    """Official (state_dict, config.json) → (our config, our state dict, report). Strict: every official tensor is
    mapped or ignored, every parameter of ours is filled, every shape matches; else a ValueError naming the keys."""
    layout = official_layout(config_dict, state_init=state_init)
    cfg = layout.config
    state = strip_prefixes(state_dict)
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise ValueError(f"the checkpoint holds non-tensor entries: {abbreviated(not_tensors)}.")
    mapping, ignored = _key_map(layout)  # every ignored tensor is optional
    missing = sorted(k for k in mapping if k not in state)
    unexpected = sorted(k for k in state if k not in mapping and k not in ignored)
    parts = [f"{what} {abbreviated(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if parts:
        hint = "is this a Parcae checkpoint, and the config.json that belongs to it?"
        raise ValueError(f"official checkpoint does not match its config: {'; '.join(parts)} ({hint})")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Parcae(cfg).state_dict().items()}
    converted: dict[str, Tensor] = {}
    wrong: list[str] = []
    for key, ours in mapping.items():
        tensor = state[key].t() if key == "lm_head.weight" and layout.tied_head_transposed else state[key]
        if tuple(tensor.shape) != expected[ours]:
            wrong.append(f"{key} {tuple(tensor.shape)} ≠ {expected[ours]}")
        else:
            converted[ours] = interleaved_to_rotate_half(tensor, cfg.head_dim) if key.endswith(_ROTATED) else tensor
    if wrong:
        raise ValueError(f"official checkpoint has wrong shapes for its config: {abbreviated(wrong)}.")
    uncovered = sorted(set(expected) - set(converted) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if uncovered:  # a parameter of our model that no official tensor fills: a bug in the mapping, never silent
        raise ValueError(f"conversion leaves parameters unfilled: {abbreviated(uncovered)}.")
    rope, mismatch = state.get("freqs_cis"), "the config.json does not belong to these weights"
    table = official_rope_table(layout.rope_positions, cfg.head_dim, cfg.rope_base)
    if rope is not None and rope.shape != table.shape:
        got = f"{tuple(rope.shape)}, not {tuple(table.shape)}"
        raise ValueError(f"freqs_cis has shape {got} (block_size/randomize_positions_from, head_dim): {mismatch}.")
    if rope is not None and not rope.is_meta:
        # libraries' cos/sin differ by ~1e-6 (more in 16 bits); another base is ≥ 0.1 off within a few dozen positions
        tolerance = max(1e-3, 4 * torch.finfo(rope.dtype).eps) if rope.is_floating_point() else 1e-3
        error = (rope.float() - table).abs().max().item()
        if error > tolerance:
            raise ValueError(f"freqs_cis does not match rope_base {cfg.rope_base:g} (max |Δ| {error:.2g}): {mismatch}.")
    head, embed = state.get("lm_head.weight"), state["transformer.wte.weight"]
    if cfg.tie_embeddings and head is not None:
        tied = head.shape == embed.shape and (head.is_meta or embed.is_meta or torch.equal(head, embed))
        if not tied:
            raise ValueError("lm_head.weight differs from transformer.wte.weight although tie_embeddings is true.")
    report = ConversionReport(config=cfg, dropped={k: v for k, v in ignored.items() if k in state})
    if layout.unknown_fields:
        report.notes.append(f"ignored config fields unknown to this converter: {', '.join(layout.unknown_fields)}")
    if layout.vocab_limit < cfg.vocab_size:
        report.vocab_limit = layout.vocab_limit
        report.notes.append(f"vocabulary padded from {layout.vocab_limit} to {cfg.vocab_size} rows")
    return cfg, converted, report


def abbreviated(names: list[str], limit: int = 8) -> str:
    """The first `limit` names, and how many more there are (for error messages)."""
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def from_parcae_lm(state_dict: dict[str, Any], config_dict: dict[str, Any], **options: Any) -> Parcae:
    """A Parcae (eval mode) with the official model's logits; `options` as in `from_parcae_lm_with_report`."""
    return from_parcae_lm_with_report(state_dict, config_dict, **options)[0]


def from_parcae_lm_with_report(
    state_dict: dict[str, Any],
    config_dict: dict[str, Any],
    *,
    state_init: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Parcae, ConversionReport]:
    """`from_parcae_lm` plus the report; `state_init`: 'zero' for parity runs, by default the official setting."""
    cfg, state, report = convert_state_dict(state_dict, config_dict, state_init=state_init)
    with torch.device("meta"):
        model = Parcae(cfg)
    model.load_weights(state, device=device)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), report


def to_parcae_lm(model: Parcae) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Our model → (official state_dict, official config.json dict); works on the meta device. Only models the
    official code can express: value embeddings exactly where the official rules put both tables and gates."""
    cfg = model.config
    checks = {
        "n_core = 0 (the official Parcae always has a core)": not cfg.is_looped,
        f"mlp {cfg.mlp!r}": cfg.mlp != "relu2",
        "injection 'diagonal-zoh'": cfg.injection == "diagonal-zoh",
        "GQA in the core": cfg.is_looped and cfg.core_kv_heads != cfg.core_heads,
        f"state_init {cfg.state_init!r}": cfg.state_init not in OFFICIAL_STATE_INITS.values(),
    }
    problems = [problem for problem, bad in checks.items() if bad]
    if problems:
        raise ValueError(f"the official format cannot express this model: {', '.join(problems)}.")
    config_dict = official_config_dict(cfg)
    layout = official_layout(config_dict)
    ours = {i for i in range(cfg.n_layers) if cfg.has_value_embedding(i)}
    gate_layers = {i for i, block in enumerate(layout.blocks) if block in layout.gates}
    if ours != set(layout.tables) or ours != gate_layers:
        where = f"tables on layers {sorted(layout.tables)} and gates on {sorted(gate_layers)} for this shape"
        raise ValueError(f"the official format puts value-embedding {where}; this model has them on {sorted(ours)}.")
    state = model.state_dict()
    official = {key: state[our_key].detach() for key, our_key in _key_map(layout)[0].items()}
    for key in [k for k in official if k.endswith(_ROTATED)]:
        official[key] = interleaved_to_rotate_half(official[key], cfg.head_dim, inverse=True)
    official["lm_head.weight"] = state["lm_head.weight"].detach()  # the official model saves the tied head too
    rope = official_rope_table(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
    official["freqs_cis"] = rope.to(state["embed.weight"].device)  # (meta stays meta)
    return official, config_dict


def parameter_count(state_dict: dict[str, Tensor], config_dict: dict[str, Any]) -> int:
    """Unique parameters of an official state dict (the tied head and the RoPE buffer not counted)."""
    skip = {"freqs_cis"} | ({"lm_head.weight"} if config_dict.get("tie_embeddings") else set())
    return sum(t.numel() for k, t in strip_prefixes(state_dict).items() if k not in skip)
