"""Pieces of the pre-training program: DeepSpeed config, checkpoints, schedule, logging."""
