"""Open a trained model for evaluation or generation: a run directory or a `save_pretrained` directory."""

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.tokenizer import Tokenizer, load_tokenizer
from ..model.config import ParcaeConfig
from ..model.io import CONFIG_FILE, WEIGHTS_FILE
from ..model.parcae import Parcae
from .checkpoint import CheckpointManager
from .config import RUN_CONFIG, TrainConfig, load_run_config


@dataclass
class LoadedRun:
    model: Parcae
    tokenizer: Tokenizer
    path: Path  # the run (or model) directory
    weights: Path  # the directory the weights came from
    train_config: TrainConfig | None  # None for a bare save_pretrained directory

    @property
    def config(self) -> ParcaeConfig:
        return self.model.config


def open_run(path: str | Path, *, checkpoint: str | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """The model of a training run (latest or named checkpoint) or of a save_pretrained directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a run or a saved model).")
    train_config, weights = None, path  # a save_pretrained directory holds config, weights and tokenizer
    if (path / RUN_CONFIG).is_file():
        _, train_config = load_run_config(path)
        manager = CheckpointManager(path)
        weights = manager.root / checkpoint if checkpoint else manager.latest()
        if weights is None or not weights.is_dir():
            raise FileNotFoundError(f"{path} has no checkpoint{' ' + checkpoint if checkpoint else ''} yet.")
        manager.verify(weights)
    elif not ((path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()):
        raise FileNotFoundError(f"{path} is neither a training run ({RUN_CONFIG}) nor a saved model ({CONFIG_FILE}).")
    model = Parcae.from_pretrained(weights, device=device).eval()
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        vocab = f"vocab {tokenizer.vocab_size} > {model.config.vocab_size}"
        raise ValueError(f"the tokenizer in {path} does not fit the model ({vocab}).")
    return LoadedRun(model=model, tokenizer=tokenizer, path=path, weights=weights, train_config=train_config)
