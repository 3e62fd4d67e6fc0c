"""Inference: sampling and generation at any depth."""
