"""Evaluation per test-time depth: loss and bits per byte (`loss`), a CORE-style harness (`core`), an
lm-evaluation-harness model (`lm_eval`, optional dependency), all scoring through `scoring`."""
