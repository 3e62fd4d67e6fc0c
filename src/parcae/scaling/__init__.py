"""Scaling laws (paper §5, App. D/L/O), one module per concern; import from them directly:

- `parcae.scaling.flops`  training FLOPs per token (`flops_per_token`, `official_flops_per_token`, `effective_params`)
- `parcae.scaling.sweep`  isoFLOP plans and the resumable runner (`make_plan`, `SweepPlan`, `run_sweep`)
- `parcae.scaling.laws`   the four fits from a results CSV (`read_results`, `fit_isoflop`, `fit_params`,
  `fit_testtime`, `fit_unified`)
- `parcae.scaling.plots`  their PNG plots

Nothing is imported here, so that `parcae --help` does not pay for scipy.
"""
