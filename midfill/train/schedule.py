"""Learning-rate and dropout schedules, as pure functions of the step."""

from __future__ import annotations

import math

from midfill.train.config import LoopConfig


def warmup_cosine(step: int, total: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at step `total`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total - warmup_steps, 1), 1.0)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def learning_rate(config: LoopConfig, step: int) -> float:
    return warmup_cosine(step, config.steps, config.lr, config.min_lr, config.warmup_steps)


def early_dropout(config: LoopConfig, step: int) -> float:
    """Early dropout (Liu et al., 2023): p at the start, linearly down to 0 over the first fraction, then off."""
    end = config.early_dropout_fraction * config.steps
    if config.early_dropout == 0 or step >= end:
        return 0.0
    return config.early_dropout * (1 - step / end)
