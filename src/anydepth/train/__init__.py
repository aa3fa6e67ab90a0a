"""Training: data, optimiser, loop, checkpoints, distributed."""
