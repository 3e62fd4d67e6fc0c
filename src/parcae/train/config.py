"""`TrainConfig` and the run configuration (model + training), as read from presets, files and `--set`."""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
from dataclasses import asdict, dataclass, fields
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

# The choices of keys whose value is one of a few names (checked, and shown by `parcae train --list-keys`).
_CHOICES: dict[str, tuple[str, ...]] = {
    "injection": INJECTIONS, "depth_sampling": DEPTH_SAMPLING, "state_init": STATE_INITS, "mlp": MLPS,
    "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "parallel": PARALLEL_MODES,
}  # fmt: skip
# The numeric fields' ranges in interval notation (a bracket includes its bound, a parenthesis not); None passes.
_RANGES = (
    ("(", 0, math.inf, ")", "steps tokens minutes seq_len batch_size grad_accum log_every eval_every checkpoint_every"),
    ("(", 0, math.inf, ")", "keep_checkpoints max_consecutive_skips lr muon_lr adam_eps"),
    ("[", 0, math.inf, ")", "eval_batches warmup_steps grad_clip spike_factor divergence_factor max_rollbacks"),
    ("[", 0, math.inf, ")", "weight_decay muon_weight_decay"),
    ("[", 0, 1, "]", "warmup cooldown min_lr_ratio"),
    ("[", 0, 1, ")", "val_fraction adam_beta1 adam_beta2 muon_momentum"),
    ("[", 0, 2**63, ")", "seed"),
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run that is not the model's shape."""

    # Each field's trailing comment is its help in `parcae train --list-keys`; optimisation defaults: the paper's 140M.
    data: str = "stdlib"  # data spec: stdlib, a file or directory, hf:NAME, or a prepared directory
    tokenizer: str = "byte"  # "byte" or a path to a tokenizer.json / directory
    text_field: str = "text"  # the text field of .jsonl / .parquet / hf: records
    val_fraction: float = 0.02  # share of documents held out for validation (by a stable hash of their id)
    seq_len: int | None = None  # None: the model's max_seq_len
    batch_size: int = 16  # sequences per micro-batch (per rank)
    grad_accum: int = 1  # global batch = batch_size × grad_accum × world size
    steps: int | None = None  # budget: optimizer steps
    tokens: int | None = None  # budget: training tokens
    minutes: float | None = None  # budget: minutes of the training loop (steps, validation, checkpoints; not setup)
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
    seed: int = 0  # seeds the weights, the data order, the sampled depths and h₀
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: auto | cpu | cuda, each rank cuda:LOCAL_RANK)
    compile: bool = False  # torch.compile per loop iteration, before and after the loop (Parcae.compile_loop)
    tune_allocator: bool = True  # on CPU: tune glibc malloc to reuse freed activations (parcae.train.allocator)
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2, sharded per block)
    lockstep: bool = False  # every rank draws the same depths and h₀ at a micro-step (else seeded per rank)
    log_every: int = 10  # steps between lines of metrics.jsonl
    eval_every: int = 200  # steps between validations
    eval_batches: int = 8  # validation batches (0: no validation)
    eval_depths: tuple[int, ...] | None = None  # None: {1, μ/2, μ, 2μ}
    checkpoint_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 3  # the newest checkpoints kept (older ones are deleted)
    max_consecutive_skips: int = 8  # non-finite steps in a row that stop the run; also the divergence patience
    divergence_factor: float = 2.0  # stop when the loss stays above factor × ln(vocab_size), i.e. diverged (0: off)
    spike_factor: float = 0.0  # > 0: a loss above factor × its running mean is a spike
    rollback_on_spike: bool = False  # on a spike, restore the weights of the latest checkpoint
    max_rollbacks: int = 3  # rollbacks before a further spike stops the run
    tensorboard: bool = False  # log to RUN/tensorboard (needs tensorboard)
    wandb: bool = False  # log to Weights & Biases (needs wandb; project from $WANDB_PROJECT)

    def __post_init__(self) -> None:
        def fail(sentence: str) -> None:
            raise ValueError(f"Invalid training config: {sentence}")

        if problem := field_type_error(self):  # every type first, then the choices and ranges
            fail(problem)
        if self.eval_depths is not None:
            object.__setattr__(self, "eval_depths", tuple(int(d) for d in self.eval_depths))
        budgets = [name for name in BUDGETS if getattr(self, name) is not None]
        if len(budgets) > 1:
            fail(f"give exactly one budget (steps, tokens or minutes), got {', '.join(budgets)}.")
        for name, what in (("optimizer", "optimizer"), ("parallel", "parallel mode"), ("schedule", "schedule")):
            if getattr(self, name) not in _CHOICES[name]:
                fail(f"unknown {what} {getattr(self, name)!r}; choose one of {', '.join(_CHOICES[name])}.")
        for left, low, high, right, names in _RANGES:
            for name in names.split():
                value = getattr(self, name)
                above = value is None or (value >= low if left == "[" else value > low)
                below = value is None or (value <= high if right == "]" else value < high)
                if not (above and below):
                    interval = f"{left}{low}, {'∞' if high == math.inf else high}{right}"
                    requirement = {"(0, ∞)": "be positive", "[0, ∞)": "be ≥ 0"}.get(interval, f"lie in {interval}")
                    fail(f"{name} must {requirement}, got {value!r}.")
        if self.warmup + self.cooldown > 1.0:
            fail(f"warmup + cooldown must not exceed 1, got {self.warmup} + {self.cooldown}.")
        if self.eval_depths is not None and (not self.eval_depths or any(d < 1 for d in self.eval_depths)):
            fail(f"eval_depths must be positive (null for the defaults), got {list(self.eval_depths)}.")

    def depths_to_evaluate(self, mean_recurrence: int) -> list[int]:
        return sorted(set(self.eval_depths or (1, max(1, mean_recurrence // 2), mean_recurrence, 2 * mean_recurrence)))

    def to_dict(self) -> dict[str, Any]:
        depths = None if self.eval_depths is None else list(self.eval_depths)
        return {**asdict(self), "eval_depths": depths}


_FIELDS = {section: {f.name for f in fields(cls)} for section, cls in (("model", ParcaeConfig), ("train", TrainConfig))}

# Floats written with an exponent but no dot ("1e-3", as JSON writers emit them), which YAML 1.1 leaves as strings.
_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_overrides(pairs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`key=value` pairs → (model overrides, train overrides); `model.` / `train.` prefixes are optional."""
    found: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}.")
        section, _, name = key.rpartition(".")
        if section not in ("", "model", "train"):
            raise ValueError(f"--set key {key!r}: the prefix must be 'model.' or 'train.'.")
        section = section or next((known for known in ("model", "train") if name in _FIELDS[known]), "")
        if not section:
            hint = _suggest(name, _FIELDS["model"] | _FIELDS["train"])
            raise ValueError(f"unknown --set key {name!r} (not a model or training field){hint}")
        if name not in _FIELDS[section]:
            what = "model" if section == "model" else "training"
            raise ValueError(f"unknown {what} field {name!r} in --set{_suggest(name, _FIELDS[section])}")
        try:  # YAML scalars and lists (1e-3, true, [1, 2, 4], null); anything else is a string
            found[section][name] = _numbers_from_strings(yaml.safe_load(raw))
        except yaml.YAMLError:
            found[section][name] = raw
    return found["model"], found["train"]


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
    return float(value) if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()) else value


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
    command_line = {**train_args, **train_set}
    file_train = dict(file.get("train") or {})
    if any(command_line.get(name) is not None for name in BUDGETS):  # a budget on the command line replaces the file's
        file_train = {name: value for name, value in file_train.items() if name not in BUDGETS}
    train_fields = {**file_train, **command_line}
    for given, section, what in ((model_fields, "model", "model"), (train_fields, "train", "training")):
        unknown = sorted(set(given) - _FIELDS[section])  # from the file: options and --set keys are known
        if unknown:
            hint = _suggest(unknown[0], _FIELDS[section])
            raise ValueError(f"unknown {what} field {unknown[0]!r} in {config_file}{hint}")
    model_cfg = get_preset(preset, **model_fields) if preset else ParcaeConfig(**model_fields)
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
    """(config, note): vocab_size from the run's tokenizer padded to VOCAB_MULTIPLE; an `explicit` one is checked."""
    from ..data.shards import is_prepared
    from ..data.tokenizer import get_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(train_cfg.data) if is_prepared(train_cfg.data) else get_tokenizer(train_cfg.tokenizer)
    tokens = tokenizer.vocab_size
    if explicit and model_cfg.vocab_size < tokens:
        fix = f"give at least {tokens} or leave vocab_size out to take it from the tokenizer"
        raise ValueError(f"vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tokens:,} tokens; {fix}.")
    rows = math.ceil(tokens / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if explicit or rows == model_cfg.vocab_size:
        return model_cfg, None
    padded = f", padded to a multiple of {VOCAB_MULTIPLE}" if rows != tokens else ""
    note = f"vocab_size {model_cfg.vocab_size:,} → {rows:,} from the tokenizer ({tokens:,} tokens{padded})"
    return model_cfg.replace(vocab_size=rows), f"{note}; --set vocab_size=N overrides it"


def field_help(cls: type) -> dict[str, str]:
    """Each dataclass field's trailing `# comment` (a one-line field at class level): the help --list-keys shows."""
    try:
        return dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.*?)\s*$", inspect.getsource(cls), re.MULTILINE))
    except (OSError, TypeError):  # no source (a frozen build): no help
        return {}


def list_keys(preset: str | None = None) -> str:
    """Every `--set` key: type, default (the preset's values when one is named) and one line of help."""
    model_defaults = (
        f"preset {preset}" if preset else "ParcaeConfig; a preset changes many, add --preset NAME to see its values"
    )
    tables: dict[str, list[tuple[str, str, str, str]]] = {}
    for title, cls, instance in (
        (f"model keys (defaults: {model_defaults})", ParcaeConfig, get_preset(preset) if preset else None),
        ("training keys", TrainConfig, None),
    ):
        helps, tables[title] = field_help(cls), []
        for item in fields(cls):
            default = getattr(instance, item.name) if instance is not None else item.default
            text = helps.get(item.name, "")
            choices = _CHOICES.get(item.name, ())
            if not all(choice in text for choice in choices):  # the help may already name them
                text = f"{text}; one of {' | '.join(choices)}" if text else " | ".join(choices)
            kind = str(item.type).replace("tuple[int, ...]", "list[int]").replace("None", "null")  # a string annotation
            value = json.dumps(list(default) if isinstance(default, tuple) else default, ensure_ascii=False)
            tables[title].append((item.name, kind, value, text))
    widths = [max(len(row[i]) for table in tables.values() for row in table) for i in range(3)]
    lines = [
        "--set KEY=VALUE sets any of these (values are YAML: 3e-3, true, [1, 2], null); "
        "model.KEY / train.KEY name the section explicitly."
    ]
    for title, table in tables.items():
        lines += ["", f"{title}:"]
        for name, kind, default, text in table:
            lines.append(f"  {name:<{widths[0]}}  {kind:<{widths[1]}}  {default:<{widths[2]}}  {text}".rstrip())
    return "\n".join(lines)
