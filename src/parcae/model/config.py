"""`ParcaeConfig`: the single source of truth for a model's shape and recipe, plus named presets.

Field names follow the paper's vocabulary (μ_rec = `mean_recurrence`, μ_bwd = `backprop_depth`).
Defaults are the paper's Parcae recipe (the 140M model of Table 18); a preset or explicit fields
override them. Derived fields left as `None` are resolved in `__post_init__`, so a saved
`config.json` always holds concrete numbers.
"""

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

# Keys that Hugging Face transformers writes into a model's config.json beside our fields (`parcae.interop.hf`); they
# describe the file, not the model, so `from_dict` skips them and one directory serves both loaders.
HF_METADATA_KEYS = frozenset({"model_type", "architectures", "transformers_version", "dtype", "torch_dtype"})


def field_type_error(config: Any) -> str | None:
    """Make every field of a (frozen) config dataclass hold its annotated type, or say which does not.

    `--set` and config files give arbitrary YAML values; a wrong type must be one clear sentence here, not a
    TypeError deep inside training. Integral floats (YAML's 1e3) become ints; floats must be finite; a bool is
    not a number; a list stands for a tuple."""
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        hint, value = hints[item.name], getattr(config, item.name)
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if int in allowed and float not in allowed and isinstance(value, float) and value.is_integer():
            value = int(value)
            object.__setattr__(config, item.name, value)
        if not any(_is_a(value, kind) for kind in allowed):
            return f"{item.name} must be {' or '.join(map(_type_name, allowed))}, got {value!r}."
    return None


def _is_a(value: Any, kind: Any) -> bool:
    if kind is type(None):
        return value is None
    if kind in (int, bool):
        return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if typing.get_origin(kind) is tuple:
        return isinstance(value, (tuple, list)) and all(_is_a(v, typing.get_args(kind)[0]) for v in value)
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(kind, "a list of integers" if typing.get_origin(kind) is tuple else str(kind))


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

    # The loop.
    injection: str = "diagonal"  # how e enters the loop (add, linear: the RDM baselines)
    prelude_norm: bool = True  # RMSNorm on the prelude output e
    mean_recurrence: int = 8  # μ_rec: mean training depth, and the default test-time depth
    backprop_depth: int | None = None  # μ_bwd; None: ⌈μ_rec / 2⌉ (paper Eq. 6)
    depth_sampling: str = "per-sequence"  # T ~ Poisson(μ_rec) drawn per sequence, batch or token; fixed: T = μ_rec
    state_init: str = "like-init"  # h₀: truncated normal (σ = init std), zero, or normal (σ = init std)

    # Blocks.
    value_embeddings: bool = True  # gated value embeddings on alternating layers
    qk_norm: bool = True  # RMSNorm on queries and keys
    mlp: str = "relu2"  # MLP activation
    tie_embeddings: bool = True  # the LM head shares the embedding matrix
    rope_base: float = 50_000.0  # rotary embedding base
    norm_eps: float = 1e-5  # RMSNorm ε

    # Explicit shapes, for checkpoints whose core or value embeddings do not follow the derived rules
    # (`parcae.interop` sets them when importing official weights). None keeps the derived value.
    n_core_heads: int | None = None  # None: d_state // head_dim
    n_core_kv_heads: int | None = None  # None: the prelude/coda GQA ratio applied to the core heads
    d_core_mlp: int | None = None  # None: d_mlp · d_state / d_model
    value_embedding_layers: tuple[int, ...] | None = None  # distinct-layer indices; None: alternating rule

    name: str = field(default="custom", compare=False)  # a label (presets set their name)

    def __post_init__(self) -> None:
        problem = field_type_error(self)
        if problem:
            raise ValueError(f"Invalid ParcaeConfig ({self.name}): {problem}")
        resolved = {
            "n_kv_heads": self.n_heads if self.n_kv_heads is None else self.n_kv_heads,
            "head_dim": (self.d_model // self.n_heads if self.n_heads > 0 else 0)
            if self.head_dim is None
            else self.head_dim,
            "d_mlp": 4 * self.d_model if self.d_mlp is None else self.d_mlp,
            "d_state": self.d_model if self.d_state is None else self.d_state,
            "backprop_depth": math.ceil(self.mean_recurrence / 2)
            if self.backprop_depth is None
            else self.backprop_depth,
        }
        for key, value in resolved.items():
            object.__setattr__(self, key, value)
        if self.value_embedding_layers is not None and isinstance(self.value_embedding_layers, (list, tuple)):
            # JSON gives a list; a sorted tuple keeps the frozen config hashable and comparable.
            layers = self.value_embedding_layers
            if all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                object.__setattr__(self, "value_embedding_layers", tuple(sorted(set(layers))))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def fail(sentence: str) -> None:
            raise ValueError(f"Invalid ParcaeConfig ({self.name}): {sentence}")

        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}.")

        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_mlp", "max_seq_len"):
            positive(name)
        for name in ("n_prelude", "n_core", "n_coda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(f"{name} must be a non-negative integer, got {value!r}.")
        if self.n_layers == 0:
            fail("the model needs at least one layer (n_prelude + n_core + n_coda ≥ 1).")
        if self.head_dim is not None and self.head_dim % 2:
            fail(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if self.n_heads * self.head_dim != self.d_model:
            fail(
                f"d_model ({self.d_model}) must equal n_heads × head_dim "
                f"({self.n_heads} × {self.head_dim}); pick a d_model divisible by the head count."
            )
        if self.n_heads % self.n_kv_heads:
            fail(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}).")
        if self.value_embeddings and self.d_model < VE_GATE_CHANNELS:
            fail(f"value embeddings need d_model ≥ {VE_GATE_CHANNELS} (their gate reads that many channels).")
        if self.rope_base <= 0:
            fail(f"rope_base must be positive, got {self.rope_base}.")
        if self.norm_eps <= 0:
            fail(f"norm_eps must be positive, got {self.norm_eps}.")
        choices = {"mlp": MLPS, "injection": INJECTIONS, "depth_sampling": DEPTH_SAMPLING, "state_init": STATE_INITS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                fail(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}.")
        for name in ("mean_recurrence", "backprop_depth", "d_state"):
            positive(name)
        if self.depth_sampling == "fixed" and self.backprop_depth > self.mean_recurrence:
            fail(
                f"backprop_depth ({self.backprop_depth}) cannot exceed mean_recurrence "
                f"({self.mean_recurrence}) with fixed depth sampling."
            )
        self._validate_explicit_shapes(fail)
        if self.n_core == 0:
            return
        if self.d_state % self.head_dim:
            fail(f"d_state ({self.d_state}) must be a multiple of head_dim ({self.head_dim}) for the core blocks.")
        if self.n_core_heads is not None and self.n_core_heads * self.head_dim != self.d_state:
            fail(
                f"d_state ({self.d_state}) must equal n_core_heads × head_dim "
                f"({self.n_core_heads} × {self.head_dim}): the core shares the rotary tables."
            )
        if self.n_core_kv_heads is None and (self.core_heads * self.n_kv_heads) % self.n_heads:
            fail(f"the core's {self.core_heads} heads cannot keep the GQA ratio {self.n_heads}:{self.n_kv_heads}.")
        if self.core_heads % self.core_kv_heads:
            fail(f"n_core_heads ({self.core_heads}) must be a multiple of n_core_kv_heads ({self.core_kv_heads}).")
        if self.d_core_mlp is None and (self.d_mlp * self.d_state) % self.d_model:
            fail(f"d_mlp × d_state / d_model must be an integer (core MLP width); got {self.d_mlp}, {self.d_state}.")
        if self.injection == "add" and self.d_state != self.d_model:
            fail(
                f"injection 'add' needs d_state == d_model (h + e), got d_state {self.d_state} "
                f"and d_model {self.d_model}."
            )
        if self.value_embeddings and self.d_state < VE_GATE_CHANNELS:
            fail(f"value embeddings need d_state ≥ {VE_GATE_CHANNELS} (their gate reads that many channels).")

    def _validate_explicit_shapes(self, fail: Any) -> None:
        for name in ("n_core_heads", "n_core_kv_heads", "d_core_mlp"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                fail(f"{name} must be a positive integer or null, got {value!r}.")
        layers = self.value_embedding_layers
        if layers is None:
            return
        if not isinstance(layers, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            fail(f"value_embedding_layers must be a list of layer indices or null, got {layers!r}.")
        if any(not 0 <= i < self.n_layers for i in layers):
            fail(f"value_embedding_layers {list(layers)} must lie in [0, {self.n_layers}) (distinct-layer indices).")

    # ------------------------------------------------------------------ derived quantities
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
        """KV heads of a core block: `n_core_kv_heads`, else the prelude/coda grouping ratio.

        (The official code forces kv heads = heads in the core; `parcae.interop` sets that explicitly.)
        """
        if self.n_core_kv_heads is not None:
            return self.n_core_kv_heads
        return self.core_heads * self.n_kv_heads // self.n_heads

    @property
    def core_d_mlp(self) -> int:
        return self.d_mlp * self.d_state // self.d_model if self.d_core_mlp is None else self.d_core_mlp

    @property
    def init_std(self) -> float:
        """σ = √(2 / (5·d)), the paper's base init std (Takase "scaled")."""
        return math.sqrt(2.0 / (5.0 * self.d_model))

    def has_value_embedding(self, layer_index: int) -> bool:
        """Alternating layers, always including the last one (nanochat's rule, as for the official tables),
        or exactly `value_embedding_layers` when given.

        `layer_index` counts distinct layers: prelude 0.., core n_prelude.., coda n_prelude+n_core..
        The same rule decides both the table and the gate, so they can never disagree.
        """
        if not self.value_embeddings:
            return False
        if self.value_embedding_layers is not None:
            return layer_index in self.value_embedding_layers
        return layer_index % 2 == (self.n_layers - 1) % 2

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParcaeConfig:
        data = {k: v for k, v in data.items() if k not in HF_METADATA_KEYS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
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
        """A copy with some fields changed; derived fields are re-derived unless given."""
        data = self.to_dict()
        # Re-derive a derived field (back to None) when what it depends on changes and it was not set explicitly.
        dependencies = {
            "n_kv_heads": ("n_heads",),
            "head_dim": ("d_model", "n_heads"),
            "d_mlp": ("d_model",),
            "d_state": ("d_model",),
            "backprop_depth": ("mean_recurrence",),
        }
        for name, depends_on in dependencies.items():
            if name not in overrides and any(dep in overrides for dep in depends_on):
                data[name] = None
        unknown = sorted(set(overrides) - set(data))
        if unknown:
            raise ValueError(f"Unknown ParcaeConfig field(s): {', '.join(unknown)}.")
        data.update(overrides)
        return ParcaeConfig(**data)


# ---------------------------------------------------------------------- presets
# Paper sizes (the paper's Tables 18 and 21): vocab 32768, context 2048, μ_rec 8 / μ_bwd 4.
_PAPER_SIZES: dict[str, dict[str, int]] = {
    "140m": {"d_model": 768, "n_heads": 6, "d_mlp": 3072, "per_part": 2},
    "370m": {"d_model": 1024, "n_heads": 8, "d_mlp": 4096, "per_part": 4},
    "770m": {"d_model": 1280, "n_heads": 10, "d_mlp": 5120, "per_part": 6},
    "1.3b": {"d_model": 1536, "n_heads": 12, "d_mlp": 6144, "per_part": 8},
}

# Tiny CPU models: the shape of small reference runs of the official code (docs/official-format.md):
# d 128, 2 heads, 2/2/2 layers, MLP 512, byte-level vocabulary (256 bytes + 3 specials, padded to 320).
_TINY = {"vocab_size": 320, "d_model": 128, "n_heads": 2, "d_mlp": 512, "max_seq_len": 256}


def _build_presets() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    for size, shape in _PAPER_SIZES.items():
        blocks = {"d_model": shape["d_model"], "n_heads": shape["n_heads"], "d_mlp": shape["d_mlp"]}
        per_part = shape["per_part"]
        presets[f"parcae-{size}"] = {**blocks, "n_prelude": per_part, "n_core": per_part, "n_coda": per_part}
        # The fixed-depth Transformer: the same blocks, 3·per_part layers, no loop.
        presets[f"gpt-{size}"] = {**blocks, "n_prelude": 3 * per_part, "n_core": 0, "n_coda": 0}
    presets["parcae-tiny"] = {**_TINY, "n_prelude": 2, "n_core": 2, "n_coda": 2}
    # Parameter-matched to parcae-tiny (within 1 %): untying the head pays for Parcae's B, C and
    # injection vectors, as the 6-layer Transformer of those reference runs.
    presets["gpt-tiny"] = {**_TINY, "n_prelude": 6, "n_core": 0, "n_coda": 0, "tie_embeddings": False}
    # The RDM baselines of the paper (Table 1): additive and concat-projection injection, no prelude norm.
    presets["rdm-add-tiny"] = {**presets["parcae-tiny"], "injection": "add", "prelude_norm": False}
    presets["rdm-linear-tiny"] = {**presets["parcae-tiny"], "injection": "linear", "prelude_norm": False}
    # A smaller model for fast tests and smoke runs.
    presets["parcae-micro"] = {
        "vocab_size": 320, "d_model": 64, "n_heads": 2, "d_mlp": 256, "max_seq_len": 128,
        "n_prelude": 1, "n_core": 1, "n_coda": 1, "mean_recurrence": 4,
    }  # fmt: skip
    return presets


PRESETS: dict[str, dict[str, Any]] = _build_presets()


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, /, **overrides: Any) -> ParcaeConfig:  # `name=` among the overrides renames it
    """A named preset, optionally with fields overridden (e.g. `injection="linear"` for the RDM baseline)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {', '.join(PRESETS)}.")
    return ParcaeConfig(**{**PRESETS[name], "name": name, **overrides})
