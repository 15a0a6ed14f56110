"""Training: the loop, optimizers and schedules, checkpoints and number formats."""
