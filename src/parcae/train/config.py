"""`TrainConfig` and the run configuration (model + training), as read from presets, files and `--set`."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..model.config import DEPTH_SAMPLING, INJECTIONS, MLPS, STATE_INITS, ParcaeConfig, field_type_error, get_preset
from .checkpoint import write_atomic
from .schedule import SCHEDULES

RUN_CONFIG = "run_config.json"
BUDGETS = ("steps", "tokens", "minutes")
PARALLEL_MODES = ("ddp", "fsdp")
OPTIMIZERS = ("muon", "adamw")
# A vocabulary taken from the tokenizer is padded to a multiple of this (the tiny presets: 259 tokens → 320 rows).
VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run that is not the model's shape."""

    # Each field's trailing comment is its help in `parcae train --list-keys` (`field_help`).
    # Data.
    data: str = "stdlib"  # data spec: stdlib, a file or directory, hf:NAME, or a prepared directory
    tokenizer: str = "byte"  # "byte" or a path to a tokenizer.json / directory
    text_field: str = "text"  # the text field of .jsonl / .parquet / hf: records
    val_fraction: float = 0.02  # share of documents held out for validation (by a stable hash of their id)
    seq_len: int | None = None  # None: the model's max_seq_len
    batch_size: int = 16  # sequences per micro-batch (per rank)
    grad_accum: int = 1  # global batch = batch_size × grad_accum × world size
    # Budget: exactly one of these.
    steps: int | None = None  # budget: optimizer steps
    tokens: int | None = None  # budget: training tokens
    minutes: float | None = None  # budget: minutes of the training loop (steps, validation, checkpoints; not setup)
    # Optimisation (defaults: the paper's recipe for its 140M model).
    optimizer: str = "muon"  # muon: Muon for attention/MLP matrices + AdamW for the rest; adamw: AdamW for all
    lr: float = 8e-3  # learning rate of the AdamW parameters (all of them with optimizer=adamw)
    muon_lr: float = 8e-3  # learning rate of the Muon matrices (optimizer=muon only)
    adam_beta1: float = 0.8  # AdamW β₁
    adam_beta2: float = 0.95  # AdamW β₂
    adam_eps: float = 1e-10  # AdamW ε
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    muon_weight_decay: float = 0.2  # Muon cautious weight decay, decayed linearly to 0 over training
    muon_momentum: float = 0.95  # Muon momentum after its warm-up from 0.85 over the first 300 steps
    schedule: str = "trapezoid"  # LR schedule after the warm-up
    warmup: float = 0.0  # LR warm-up as a fraction of the budget
    warmup_steps: int | None = None  # LR warm-up in optimizer steps; when set, wins over warmup
    cooldown: float = 0.5  # trapezoid: linear decay over this last fraction of the budget
    min_lr_ratio: float = 0.0  # the LR the schedule decays to, as a fraction of lr / muon_lr
    grad_clip: float = 1.0  # gradient-norm clipping (0: off)
    # Runtime.
    seed: int = 0  # seeds the weights, the data order, the sampled depths and h₀
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: auto | cpu | cuda, each rank cuda:LOCAL_RANK)
    compile: bool = False  # torch.compile per loop iteration, before and after the loop (Parcae.compile_loop)
    tune_allocator: bool = True  # on CPU: tune glibc malloc to reuse freed activations (parcae.train.allocator)
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2, sharded per block)
    lockstep: bool = False  # every rank draws the same depths and h₀ at a micro-step (else seeded per rank)
    # Monitoring.
    log_every: int = 10  # steps between lines of metrics.jsonl
    eval_every: int = 200  # steps between validations
    eval_batches: int = 8  # validation batches (0: no validation)
    eval_depths: tuple[int, ...] | None = None  # None: {1, μ/2, μ, 2μ}
    checkpoint_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 3  # the newest checkpoints kept (older ones are deleted)
    # Guardrails.
    max_consecutive_skips: int = 8  # non-finite steps in a row that stop the run; also the divergence patience
    divergence_factor: float = 2.0  # stop when the loss stays above factor × ln(vocab_size), i.e. diverged (0: off)
    spike_factor: float = 0.0  # > 0: a loss above factor × its running mean is a spike
    rollback_on_spike: bool = False  # on a spike, restore the weights of the latest checkpoint
    max_rollbacks: int = 3  # rollbacks before a further spike stops the run
    tensorboard: bool = False  # log to RUN/tensorboard (needs tensorboard)
    wandb: bool = False  # log to Weights & Biases (needs wandb; project from $WANDB_PROJECT)

    def __post_init__(self) -> None:
        problem = field_type_error(self)
        if problem:
            raise ValueError(f"Invalid training config: {problem}")
        if self.eval_depths is not None:
            object.__setattr__(self, "eval_depths", tuple(int(d) for d in self.eval_depths))
        self._validate()

    def _validate(self) -> None:
        """Ranges and choices (`field_type_error` has checked every type)."""

        def fail(sentence: str) -> None:
            raise ValueError(f"Invalid training config: {sentence}")

        budgets = [name for name in BUDGETS if getattr(self, name) is not None]
        if len(budgets) > 1:
            fail(f"give exactly one budget (steps, tokens or minutes), got {', '.join(budgets)}.")
        for name in BUDGETS:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                fail(f"{name} must be a positive number, got {getattr(self, name)!r}.")
        for name in ("batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                fail(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.seq_len is not None and self.seq_len < 1:
            fail(f"seq_len must be a positive integer, got {self.seq_len!r}.")
        if self.eval_batches < 0:
            fail(f"eval_batches must be ≥ 0, got {self.eval_batches}.")
        if self.optimizer not in OPTIMIZERS:
            fail(f"unknown optimizer {self.optimizer!r}; choose 'muon' or 'adamw'.")
        if self.parallel not in PARALLEL_MODES:
            fail(f"unknown parallel mode {self.parallel!r}; choose one of {', '.join(PARALLEL_MODES)}.")
        if self.schedule not in SCHEDULES:
            fail(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        for name in ("warmup", "cooldown", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(f"{name} must lie in [0, 1], got {getattr(self, name)}.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            fail(f"warmup_steps must be ≥ 0 (null: use warmup), got {self.warmup_steps}.")
        if self.warmup + self.cooldown > 1.0:
            fail(f"warmup + cooldown must not exceed 1, got {self.warmup} + {self.cooldown}.")
        if not 0.0 <= self.val_fraction < 1.0:
            fail(f"val_fraction must lie in [0, 1), got {self.val_fraction}.")
        for name in ("lr", "muon_lr"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}.")
        if self.grad_clip < 0 or self.spike_factor < 0 or self.divergence_factor < 0:
            fail("grad_clip, spike_factor and divergence_factor must be ≥ 0.")
        if self.eval_depths is not None and (not self.eval_depths or any(d < 1 for d in self.eval_depths)):
            fail(f"eval_depths must be positive (null for the defaults), got {list(self.eval_depths)}.")
        for name in ("adam_beta1", "adam_beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(f"{name} must lie in [0, 1), got {getattr(self, name)}.")
        if self.adam_eps <= 0 or self.weight_decay < 0 or self.muon_weight_decay < 0:
            fail("adam_eps must be positive; weight_decay and muon_weight_decay must be ≥ 0.")
        if self.max_consecutive_skips < 1 or self.max_rollbacks < 0:
            fail("max_consecutive_skips must be ≥ 1 and max_rollbacks ≥ 0.")
        if not 0 <= self.seed < 2**63:
            fail(f"seed must lie in [0, 2⁶³), got {self.seed}.")

    def depths_to_evaluate(self, mean_recurrence: int) -> list[int]:
        if self.eval_depths is not None:
            return sorted(set(self.eval_depths))
        return sorted({1, max(1, mean_recurrence // 2), mean_recurrence, 2 * mean_recurrence})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["eval_depths"] is not None:
            data["eval_depths"] = list(data["eval_depths"])
        return data


_MODEL_FIELDS = {f.name for f in dataclasses.fields(ParcaeConfig)}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


# Floats written with an exponent but no dot ("1e-3", as JSON writers emit them), which YAML 1.1 leaves as strings.
_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars and lists (1e-3, true, [1, 2, 4], null); anything else is a string."""
    try:
        return _numbers_from_strings(yaml.safe_load(text))
    except yaml.YAMLError:
        return text


def parse_overrides(pairs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`key=value` pairs → (model overrides, train overrides); `model.` / `train.` prefixes are optional."""
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}.")
        section, _, name = key.rpartition(".")
        if section not in ("", "model", "train"):
            raise ValueError(f"--set key {key!r}: the prefix must be 'model.' or 'train.'.")
        in_model, in_train = name in _MODEL_FIELDS, name in _TRAIN_FIELDS
        if section == "model" or (not section and in_model):
            if not in_model:
                raise ValueError(f"unknown model field {name!r} in --set{_suggest(name, _MODEL_FIELDS)}")
            model[name] = parse_value(raw)
        elif section == "train" or in_train:
            if not in_train:
                raise ValueError(f"unknown training field {name!r} in --set{_suggest(name, _TRAIN_FIELDS)}")
            train[name] = parse_value(raw)
        else:
            hint = _suggest(name, _MODEL_FIELDS | _TRAIN_FIELDS)
            raise ValueError(f"unknown --set key {name!r} (not a model or training field){hint}")
    return model, train


def _suggest(name: str, keys: set[str]) -> str:
    """The end of an unknown-key message: close matches, and where to find every key."""
    close = difflib.get_close_matches(name, sorted(keys), n=3, cutoff=0.6)
    maybe = f"; did you mean {' or '.join(map(repr, close))}?" if close else "."
    return f"{maybe} `parcae train --list-keys` lists every key."


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file with optional `preset`, `model` and `train` sections."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found.")
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML/JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or not set(data) <= {"preset", "model", "train"}:
        raise ValueError(f"config file {path} must be a mapping with keys among preset, model, train.")
    return _numbers_from_strings(data)


def _numbers_from_strings(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _numbers_from_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers_from_strings(item) for item in value]
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def build_configs(
    preset: str | None, config_file: str | None, overrides: list[str], train_args: dict[str, Any]
) -> tuple[ParcaeConfig, TrainConfig]:
    """Resolve (model, training) configs: file/preset, then command-line options, then `--set`."""
    file = load_config_file(config_file) if config_file else {}
    preset = preset or file.get("preset")
    model_fields = dict(file.get("model") or {})
    if preset is None and not model_fields:
        raise ValueError("choose a model with --preset NAME or --config FILE.")
    model_set, train_set = parse_overrides(overrides)
    model_fields.update(model_set)
    unknown = sorted(set(model_fields) - _MODEL_FIELDS)  # from the file: --set keys were checked above
    if unknown:
        raise ValueError(f"unknown model field {unknown[0]!r} in {config_file}{_suggest(unknown[0], _MODEL_FIELDS)}")
    model_cfg = get_preset(preset, **model_fields) if preset else ParcaeConfig(**model_fields)
    command_line = {**train_args, **train_set}
    file_train = dict(file.get("train") or {})
    if any(command_line.get(name) is not None for name in BUDGETS):
        for name in BUDGETS:  # a budget on the command line replaces the file's
            file_train.pop(name, None)
    train_fields = {**file_train, **command_line}
    unknown = sorted(set(train_fields) - _TRAIN_FIELDS)  # from the file: options and --set keys are known
    if unknown:
        raise ValueError(f"unknown training field {unknown[0]!r} in {config_file}{_suggest(unknown[0], _TRAIN_FIELDS)}")
    return model_cfg, TrainConfig(**train_fields)


def save_run_config(run_dir: Path, model_cfg: ParcaeConfig, train_cfg: TrainConfig) -> None:
    """Atomically: a crash while a resume rewrites it must not leave a run that cannot be resumed."""
    text = json.dumps({"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}, indent=2) + "\n"
    write_atomic(run_dir / RUN_CONFIG, text)


def load_run_config(run_dir: Path) -> tuple[ParcaeConfig, TrainConfig]:
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run ({RUN_CONFIG} missing).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ParcaeConfig.from_dict(data["model"]), TrainConfig(**data["train"])
    except (ValueError, TypeError, KeyError) as err:  # truncated, edited or from another version
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a valid run configuration ({reason}).") from None


def sets_vocab(config_file: str | None, overrides: list[str]) -> bool:
    """Whether vocab_size is given explicitly (by --set or the config file's model section)."""
    if "vocab_size" in parse_overrides(overrides)[0]:
        return True
    model = load_config_file(config_file).get("model") if config_file else None
    return isinstance(model, dict) and "vocab_size" in model


def fit_vocab_to_tokenizer(
    model_cfg: ParcaeConfig, train_cfg: TrainConfig, *, explicit: bool
) -> tuple[ParcaeConfig, str | None]:
    """The model config with vocab_size from the run's tokenizer padded to VOCAB_MULTIPLE (an `explicit` one must
    hold every token), and a one-line note when that changed vocab_size."""
    from ..data.shards import is_prepared
    from ..data.tokenizer import get_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(train_cfg.data) if is_prepared(train_cfg.data) else get_tokenizer(train_cfg.tokenizer)
    tokens = tokenizer.vocab_size
    if explicit:
        if model_cfg.vocab_size < tokens:
            raise ValueError(
                f"vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tokens:,} tokens; give at "
                f"least {tokens} or leave vocab_size out to take it from the tokenizer."
            )
        return model_cfg, None
    rows = math.ceil(tokens / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if rows == model_cfg.vocab_size:
        return model_cfg, None
    note = (
        f"vocab_size {model_cfg.vocab_size:,} → {rows:,} from the tokenizer ({tokens:,} tokens"
        + (f", padded to a multiple of {VOCAB_MULTIPLE})" if rows != tokens else ")")
        + "; --set vocab_size=N overrides it"
    )
    return model_cfg.replace(vocab_size=rows), note


# `parcae train --list-keys` shows the choices of keys whose value is one of a few names.
_CHOICES: dict[str, tuple[str, ...]] = {
    "injection": INJECTIONS, "depth_sampling": DEPTH_SAMPLING, "state_init": STATE_INITS, "mlp": MLPS,
    "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "parallel": PARALLEL_MODES,
}  # fmt: skip


def field_help(cls: type) -> dict[str, str]:
    """Each dataclass field's trailing `# comment`: the help --list-keys shows (empty without the source)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    class_node = ast.parse(source).body[0]
    assert isinstance(class_node, ast.ClassDef)
    return {
        node.target.id: comments[node.end_lineno]
        for node in class_node.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in comments
    }


def list_keys(preset: str | None = None) -> str:
    """Every `--set` key of the model and the training config: type, default (the preset's values when one is
    named) and one line of help."""
    model_defaults = get_preset(preset) if preset else None
    sections = [
        (f"model keys (defaults: preset {preset})" if preset else
         "model keys (defaults: ParcaeConfig; a preset changes many, add --preset NAME to see its values)",
         ParcaeConfig, model_defaults),
        ("training keys", TrainConfig, None),
    ]  # fmt: skip
    rows: list[tuple[str, str, str, str] | str] = [
        "--set KEY=VALUE sets any of these (values are YAML: 3e-3, true, [1, 2], null); "
        "model.KEY / train.KEY name the section explicitly."
    ]
    for title, cls, instance in sections:
        hints, helps = typing.get_type_hints(cls), field_help(cls)
        rows += ["", f"{title}:"]
        for item in dataclasses.fields(cls):
            default = getattr(instance, item.name) if instance is not None else item.default
            text = helps.get(item.name, "")
            choices = _CHOICES.get(item.name, ())
            if not all(choice in text for choice in choices):  # the help may already name them
                text = f"{text}; one of {' | '.join(choices)}" if text else " | ".join(choices)
            rows.append((item.name, _type_text(hints[item.name]), _value_text(default), text))
    widths = [max(len(row[i]) for row in rows if isinstance(row, tuple)) for i in range(3)]
    lines = []
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
        else:
            name, kind, default, text = row
            lines.append(f"  {name:<{widths[0]}}  {kind:<{widths[1]}}  {default:<{widths[2]}}  {text}".rstrip())
    return "\n".join(lines)


def _type_text(hint: Any) -> str:
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "str"}
    return " | ".join(names.get(k, "list[int]" if typing.get_origin(k) is tuple else str(k)) for k in kinds)


def _value_text(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)
