"""Reading official `parcae-lm` checkpoint directories: config.json plus safetensors or weights-only pickles."""

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..model.io import CONFIG_FILE
from ..model.parcae import Parcae
from .official import ConversionReport, abbreviated, from_parcae_lm_with_report

OFFICIAL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")  # by preference


def read_parcae_lm(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state_dict, config dict) of an official checkpoint directory."""
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
    state: dict[str, Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):  # one file or shards
        try:
            part = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read {path}: {err}") from None
        clash = sorted(set(part) & set(state))
        if clash:
            raise ValueError(f"{path} repeats tensors of another shard: {abbreviated(clash)}.")
        state.update(part)
    pickles = [directory / name for name in OFFICIAL_WEIGHT_FILES[1:] if (directory / name).is_file()]
    if not state and not pickles:
        raise FileNotFoundError(f"{directory} has no weights ({', '.join(OFFICIAL_WEIGHT_FILES)} or *.safetensors).")
    return state or read_torch_weights(pickles[0]), config_dict


def read_torch_weights(path: str | Path) -> dict[str, Tensor]:
    """A `torch.save`d state dict, loaded with weights_only=True (never arbitrary pickled code)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, pickle.UnpicklingError):
            raise ValueError(f"{path} is not a weights-only checkpoint (it would run pickled code): {reason}") from None
        raise ValueError(f"cannot read {path}: {reason}") from None
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
    try:
        data = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "n_layers_in_recurrent_block" in data


def load_parcae_lm(
    directory: str | Path, *, state_init: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Parcae, ConversionReport]:
    """Read and convert an official checkpoint directory."""
    return from_parcae_lm_with_report(*read_parcae_lm(directory), state_init=state_init, device=device)
