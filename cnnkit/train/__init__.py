"""Training: the loop, optimizers and schedules, and number formats (checkpoints are cnnkit/checkpoint.py)."""
