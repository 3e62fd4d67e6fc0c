"""Scaling laws (paper §5): `flops`, `sweep`, `laws` (fits), `fitting`, `plots`; import from those modules.
Nothing is imported here, so that `parcae --help` does not pay for scipy."""
