"""Evaluation per test-time depth: loss and bits per byte, CORE, batched scoring and the loop's Jacobian spectrum."""
