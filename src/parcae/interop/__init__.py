"""Other formats: official `parcae-lm` checkpoints (`official`), Hugging Face transformers (`hf`, needs the `hf`
extra) and the lm-evaluation-harness adapter (`lm_eval`)."""

from .official import convert_checkpoint, from_parcae_lm, load_parcae_lm, to_parcae_lm

__all__ = ["convert_checkpoint", "from_parcae_lm", "load_parcae_lm", "to_parcae_lm"]
