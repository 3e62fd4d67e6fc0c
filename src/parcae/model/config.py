"""`ParcaeConfig`: a model's shape and recipe (defaults: the paper's 140M Parcae of Table 18), plus named presets.
Derived fields left `None` are resolved in `__post_init__`, so a saved `config.json` always holds concrete numbers."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INJECTIONS = ("diagonal", "diagonal-zoh", "linear", "add")
DEPTH_SAMPLING = ("per-sequence", "per-batch", "per-token", "fixed")
STATE_INITS = ("like-init", "zero", "normal")
MLPS = ("relu2", "swiglu")

# The value-embedding gate reads the first 32 channels of the normed block input, as in the official code.
VE_GATE_CHANNELS = 32

# Keys Hugging Face writes into config.json beside our fields (`parcae.interop.hf`): `from_dict` skips them.
HF_METADATA_KEYS = frozenset({"model_type", "architectures", "transformers_version", "dtype", "torch_dtype"})

_POSITIVE = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_mlp", "max_seq_len", "d_state")
_BOUNDS = (  # fields that must exceed a bound (`field_type_error` has checked their types)
    ((*_POSITIVE, "mean_recurrence", "backprop_depth"), 0, "a positive integer"),
    (("n_prelude", "n_core", "n_coda"), -1, "a non-negative integer"),
    (("n_core_heads", "n_core_kv_heads", "d_core_mlp"), 0, "a positive integer or null"),
    (("rope_base", "norm_eps"), 0, "positive"),
)

_TYPE_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "null"}

_FOLLOWERS = {  # a field, and the derived fields (None: resolved in `__post_init__`) that follow it
    "n_heads": ("n_kv_heads", "head_dim"),
    "d_model": ("head_dim", "d_mlp", "d_state"),
    "mean_recurrence": ("backprop_depth",),
}


def field_type_error(config: Any) -> str | None:
    """Make each field of a (frozen) config dataclass hold its annotated type, or say which does not, in one sentence
    (bad `--set` values fail early). Integral floats (1e3) become ints; floats must be finite; a list is a tuple."""
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        hint, value = hints[item.name], getattr(config, item.name)
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if int in allowed and float not in allowed and isinstance(value, float) and value.is_integer():
            value = int(value)
            object.__setattr__(config, item.name, value)
        if not any(_is_a(value, kind) for kind in allowed):
            wanted = " or ".join(_TYPE_NAMES.get(kind, "a list of integers") for kind in allowed)
            return f"{item.name} must be {wanted}, got {value!r}."
    return None


def _is_a(value: Any, kind: Any) -> bool:
    if isinstance(value, bool):  # a bool is not a number
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if typing.get_origin(kind) is tuple:
        return isinstance(value, (tuple, list)) and all(_is_a(v, typing.get_args(kind)[0]) for v in value)
    return isinstance(value, kind)


@dataclass(frozen=True)
class ParcaeConfig:
    """Shape and recipe of a Parcae model (or, with `n_core = 0`, a fixed-depth Transformer)."""

    vocab_size: int = 32768  # embedding / head rows (at least the tokenizer's vocabulary)
    d_model: int = 768  # residual stream width
    n_heads: int = 6  # attention heads of the prelude and coda blocks
    n_kv_heads: int | None = None  # None: = n_heads (no GQA)
    head_dim: int | None = None  # None: d_model // n_heads
    d_mlp: int | None = None  # None: 4 · d_model
    n_prelude: int = 2  # prelude blocks P (run once)
    n_core: int = 2  # 0 = fixed-depth Transformer (prelude + coda only)
    n_coda: int = 2  # coda blocks C (run once, after the loop)
    d_state: int | None = None  # recurrent state width d_h; None: = d_model
    max_seq_len: int = 2048  # context length (rotary tables)
    injection: str = "diagonal"  # how e enters the loop (add, linear: the RDM baselines)
    prelude_norm: bool = True  # RMSNorm on the prelude output e
    mean_recurrence: int = 8  # μ_rec: mean training depth, and the default test-time depth
    backprop_depth: int | None = None  # μ_bwd; None: ⌈μ_rec / 2⌉ (paper Eq. 6)
    depth_sampling: str = "per-sequence"  # T ~ Poisson(μ_rec) drawn per sequence, batch or token; fixed: T = μ_rec
    state_init: str = "like-init"  # h₀: truncated normal (σ = init std), zero, or normal (σ = init std)
    value_embeddings: bool = True  # gated value embeddings on alternating layers
    qk_norm: bool = True  # RMSNorm on queries and keys
    mlp: str = "relu2"  # MLP activation
    tie_embeddings: bool = True  # the LM head shares the embedding matrix
    rope_base: float = 50_000.0  # rotary embedding base
    norm_eps: float = 1e-5  # RMSNorm ε
    # Explicit shapes for checkpoints off the derived rules (`parcae.interop`: official weights); None: derived.
    n_core_heads: int | None = None  # None: d_state // head_dim
    n_core_kv_heads: int | None = None  # None: the prelude/coda GQA ratio applied to the core heads
    d_core_mlp: int | None = None  # None: d_mlp · d_state / d_model
    value_embedding_layers: tuple[int, ...] | None = None  # distinct-layer indices; None: alternating rule
    name: str = field(default="custom", compare=False)  # a label (presets set their name)

    def __post_init__(self) -> None:
        problem = field_type_error(self)
        if problem is None:
            derived = {
                "n_kv_heads": self.n_heads,
                "head_dim": self.d_model // self.n_heads if self.n_heads > 0 else 0,
                "d_mlp": 4 * self.d_model,
                "d_state": self.d_model,
                "backprop_depth": math.ceil(self.mean_recurrence / 2),
            }
            for key, value in derived.items():
                if getattr(self, key) is None:
                    object.__setattr__(self, key, value)
            if self.value_embedding_layers is not None:  # JSON gives a list; a sorted tuple stays hashable
                object.__setattr__(self, "value_embedding_layers", tuple(sorted(set(self.value_embedding_layers))))
            problem = self._problem()
        if problem:
            raise ValueError(f"Invalid ParcaeConfig ({self.name}): {problem}")

    def _problem(self) -> str | None:
        """The first inconsistency of the (typed, resolved) fields as one sentence, or None."""
        for names, bound, wanted in _BOUNDS:
            for name in names:
                value = getattr(self, name)
                if value is not None and value <= bound:
                    return f"{name} must be {wanted}, got {value!r}."
        if self.n_layers == 0:
            return "the model needs at least one layer (n_prelude + n_core + n_coda ≥ 1)."
        if self.head_dim % 2:
            return f"head_dim must be even for rotary embeddings, got {self.head_dim}."
        if self.n_heads * self.head_dim != self.d_model:
            return f"d_model ({self.d_model}) must equal n_heads × head_dim ({self.n_heads} × {self.head_dim})."
        if self.n_heads % self.n_kv_heads:
            return f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})."
        if self.value_embeddings and self.d_model < VE_GATE_CHANNELS:
            return f"value embeddings need d_model ≥ {VE_GATE_CHANNELS} (their gate reads that many channels)."
        choices = {"mlp": MLPS, "injection": INJECTIONS, "depth_sampling": DEPTH_SAMPLING, "state_init": STATE_INITS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                return f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}."
        if self.depth_sampling == "fixed" and self.backprop_depth > self.mean_recurrence:
            return f"backprop_depth ({self.backprop_depth}) cannot exceed mean_recurrence with fixed depth sampling."
        if any(not 0 <= i < self.n_layers for i in self.value_embedding_layers or ()):
            return f"value_embedding_layers {list(self.value_embedding_layers)} must lie in [0, {self.n_layers})."
        if self.n_core == 0:
            return None
        if self.d_state % self.head_dim:
            return f"d_state ({self.d_state}) must be a multiple of head_dim ({self.head_dim}) for the core blocks."
        if self.n_core_heads is not None and self.n_core_heads * self.head_dim != self.d_state:
            return f"d_state {self.d_state} must equal n_core_heads × head_dim = {self.n_core_heads} × {self.head_dim}."
        if self.n_core_kv_heads is None and (self.core_heads * self.n_kv_heads) % self.n_heads:
            return f"the core's {self.core_heads} heads cannot keep the GQA ratio {self.n_heads}:{self.n_kv_heads}."
        if self.core_heads % self.core_kv_heads:
            return f"n_core_heads ({self.core_heads}) must be a multiple of n_core_kv_heads ({self.core_kv_heads})."
        if self.d_core_mlp is None and (self.d_mlp * self.d_state) % self.d_model:
            return f"d_mlp × d_state / d_model must be an integer (core MLP width); got {self.d_mlp}, {self.d_state}."
        if self.injection == "add" and self.d_state != self.d_model:
            return f"injection 'add' needs d_state == d_model (h + e), got {self.d_state} and {self.d_model}."
        if self.value_embeddings and self.d_state < VE_GATE_CHANNELS:
            return f"value embeddings need d_state ≥ {VE_GATE_CHANNELS} (their gate reads that many channels)."
        return None

    @property
    def n_layers(self) -> int:
        """Distinct layers (the core counted once)."""
        return self.n_prelude + self.n_core + self.n_coda

    @property
    def is_looped(self) -> bool:
        return self.n_core > 0

    @property
    def core_heads(self) -> int:
        """Heads of a core block: `n_core_heads`, else as many head_dim-wide heads as d_state holds."""
        return self.d_state // self.head_dim if self.n_core_heads is None else self.n_core_heads

    @property
    def core_kv_heads(self) -> int:
        """KV heads of a core block: `n_core_kv_heads` (official weights: = heads), else the prelude/coda GQA ratio."""
        return self.n_core_kv_heads or self.core_heads * self.n_kv_heads // self.n_heads  # None, or validated ≥ 1

    @property
    def core_d_mlp(self) -> int:
        return self.d_mlp * self.d_state // self.d_model if self.d_core_mlp is None else self.d_core_mlp

    @property
    def init_std(self) -> float:
        """σ = √(2 / (5·d)), the paper's base init std (Takase "scaled")."""
        return math.sqrt(2.0 / (5.0 * self.d_model))

    def has_value_embedding(self, layer_index: int) -> bool:
        """Whether distinct layer `layer_index` has one: as listed, else alternate layers ending with the last one."""
        if not self.value_embeddings:
            return False
        if self.value_embedding_layers is not None:
            return layer_index in self.value_embedding_layers
        return layer_index % 2 == (self.n_layers - 1) % 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParcaeConfig:
        data = {k: v for k, v in data.items() if k not in HF_METADATA_KEYS}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"Unknown ParcaeConfig field(s): {', '.join(unknown)}.")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ParcaeConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object of ParcaeConfig fields.")
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> ParcaeConfig:
        """A copy with some fields changed; a derived field not given is re-derived when what it follows changes."""
        data = self.to_dict()
        for followed, followers in _FOLLOWERS.items():
            if followed in overrides:
                data.update({name: None for name in followers if name not in overrides})
        unknown = sorted(set(overrides) - set(data))
        if unknown:
            raise ValueError(f"Unknown ParcaeConfig field(s): {', '.join(unknown)}.")
        return ParcaeConfig(**{**data, **overrides})


# ---------------------------------------------------------------------- presets
# Paper sizes (Tables 18 and 21; vocab 32768, context 2048, μ_rec 8): d_model, n_heads, layers per part; MLP 4 · d.
_PAPER_SIZES = {"140m": (768, 6, 2), "370m": (1024, 8, 4), "770m": (1280, 10, 6), "1.3b": (1536, 12, 8)}

# Tiny CPU models, shaped as small reference runs of the official code; 320 = 256 bytes + 3 specials, padded.
_TINY = {"vocab_size": 320, "d_model": 128, "n_heads": 2, "d_mlp": 512, "max_seq_len": 256}


def _build_presets() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    for size, (d_model, n_heads, per_part) in _PAPER_SIZES.items():
        blocks = {"d_model": d_model, "n_heads": n_heads, "d_mlp": 4 * d_model}
        presets[f"parcae-{size}"] = {**blocks, "n_prelude": per_part, "n_core": per_part, "n_coda": per_part}
        presets[f"gpt-{size}"] = {**blocks, "n_prelude": 3 * per_part, "n_core": 0, "n_coda": 0}
    presets["parcae-tiny"] = {**_TINY, "n_prelude": 2, "n_core": 2, "n_coda": 2}
    # Parameter-matched to parcae-tiny (1 %): the untied head pays for Parcae's B, C and injection, as in those runs.
    presets["gpt-tiny"] = {**_TINY, "n_prelude": 6, "n_core": 0, "n_coda": 0, "tie_embeddings": False}
    # The RDM baselines of the paper (Table 1): additive and concat-projection injection, no prelude norm.
    presets["rdm-add-tiny"] = {**presets["parcae-tiny"], "injection": "add", "prelude_norm": False}
    presets["rdm-linear-tiny"] = {**presets["parcae-tiny"], "injection": "linear", "prelude_norm": False}
    micro = {"d_model": 64, "d_mlp": 256, "max_seq_len": 128, "n_prelude": 1, "n_core": 1, "n_coda": 1}
    presets["parcae-micro"] = {**_TINY, **micro, "mean_recurrence": 4}  # for fast tests and smoke runs
    return presets


PRESETS: dict[str, dict[str, Any]] = _build_presets()


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, /, **overrides: Any) -> ParcaeConfig:  # `name=` among the overrides renames it
    """A named preset, optionally with fields overridden (e.g. `injection="linear"` for the RDM baseline)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {', '.join(PRESETS)}.")
    return ParcaeConfig(**{**PRESETS[name], "name": name, **overrides})
