"""Cosine learning-rate schedule with linear warm-up (METHOD.md, Training)."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, *, warmup_steps: int, max_steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate at ``step``: linear from 0 over ``warmup_steps``, then cosine to ``min_lr`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
