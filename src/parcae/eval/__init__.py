"""Evaluation: loss and bits-per-byte across test-time depths."""
