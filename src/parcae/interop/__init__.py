"""Other formats: official `parcae-lm` checkpoints, the Hugging Face layout, transformers (`hf`) and lm-eval."""

from .hf_directory import convert_checkpoint
from .official import from_parcae_lm, to_parcae_lm
from .official_files import load_parcae_lm

__all__ = ["convert_checkpoint", "from_parcae_lm", "load_parcae_lm", "to_parcae_lm"]
