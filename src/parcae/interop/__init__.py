"""Other formats: official `parcae-lm` checkpoints (`official`: conversion, `official_files`: reading them),
the Hugging Face directory layout and `parcae convert` (`hf_directory`), Hugging Face transformers (`hf`, needs
the `hf` extra) and the lm-evaluation-harness adapter (`lm_eval`)."""

from .hf_directory import convert_checkpoint
from .official import from_parcae_lm, to_parcae_lm
from .official_files import load_parcae_lm

__all__ = ["convert_checkpoint", "from_parcae_lm", "load_parcae_lm", "to_parcae_lm"]
