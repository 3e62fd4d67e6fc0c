"""Evaluation per test-time depth: loss and bits per byte (`loss`), a CORE-style harness (`core`, task files from
`bundle`), both scoring through `scoring`, and the loop's Jacobian spectrum (`stability`)."""
