"""Training: optimiser, schedules, checkpoints and the trainer."""
