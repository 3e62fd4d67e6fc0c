"""Parcae: stable looped language models (arXiv 2604.12946)."""

from .model.config import ParcaeConfig, get_preset, preset_names
from .model.parcae import Parcae, ParcaeOutput, count_params
from .model.recurrence import DepthPlan, DepthSampler

__all__ = ["DepthPlan", "DepthSampler", "Parcae", "ParcaeConfig", "ParcaeOutput"]
__all__ += ["count_params", "get_preset", "preset_names"]
__version__ = "0.1.0"
