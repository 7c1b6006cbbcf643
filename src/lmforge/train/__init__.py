"""The shared training loop and what it needs: optimizer, schedule, checkpoints, distributed, metrics."""
