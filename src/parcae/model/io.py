"""Persistence: a model directory is `config.json` + `model.safetensors` (the tied head stored once)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import ParcaeConfig
from .layers import Rotary

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_Model = TypeVar("_Model", bound="Pretrained")


class Pretrained(nn.Module):
    """`save_pretrained` / `from_pretrained` / strict `load_weights` for a module built from a `ParcaeConfig`."""

    config: ParcaeConfig
    rotary: Rotary

    def tie_weights(self) -> None: ...  # the model ties its head to its embedding

    def _stored(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The entries a file holds: all but a tied head, which is the embedding."""
        tied = self.config.tie_embeddings
        return {name: t for name, t in state.items() if not (tied and name == "lm_head.weight")}

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().contiguous() for name, t in self._stored(self.state_dict()).items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "parcae", "version": "1"})
        self.config.save(directory / CONFIG_FILE)

    @classmethod
    def from_pretrained(
        cls: type[_Model], directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> _Model:
        """Load a model saved by `save_pretrained`; every tensor must match (strict), else ValueError."""
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found (expected a save_pretrained directory).")
        config = ParcaeConfig.load(directory / CONFIG_FILE)
        try:
            state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read {directory / WEIGHTS_FILE}: {err}") from None
        with torch.device("meta"):
            model = cls(config)
        model.load_weights(state, device=device)
        if dtype is not None:
            model.to(dtype)
        return model

    def load_weights(self, state: dict[str, Tensor], device: str | torch.device | None = None) -> None:
        """Strictly load a state dict (tied head optional); ValueError naming any mismatched keys."""
        expected = {name: tuple(t.shape) for name, t in self._stored(self.state_dict()).items()}
        state = self._stored(state)
        found = {"missing": sorted(set(expected) - set(state)), "unexpected": sorted(set(state) - set(expected))}
        shapes = {name: tuple(state[name].shape) for name in sorted(set(expected) & set(state))}
        found["wrong shape"] = [f"{k} {shape} ≠ {expected[k]}" for k, shape in shapes.items() if shape != expected[k]]
        problems = [f"{what} {_summarise(names)}" for what, names in found.items() if names]
        if problems:
            raise ValueError(f"weights do not match the {self.config.name} config: " + "; ".join(problems) + ".")
        if any(p.is_meta for p in self.parameters()):
            cfg = self.config
            self.to_empty(device=device or "cpu")
            self.tie_weights()
            self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base).to(device or "cpu")
        if self.config.tie_embeddings:
            state = {**state, "lm_head.weight": state["embed.weight"]}
        self.load_state_dict(state, strict=True)


def _summarise(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
