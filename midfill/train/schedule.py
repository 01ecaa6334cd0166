"""Learning-rate and dropout schedules, as pure functions of the step."""

from __future__ import annotations

import math

from midfill.train.config import TrainConfig


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def early_dropout(config: TrainConfig, step: int) -> float:
    """Early dropout (Liu et al., 2023): p at the start, linearly down to 0 over the first fraction, then off."""
    end = config.early_dropout_fraction * config.steps
    if config.early_dropout == 0 or step >= end:
        return 0.0
    return config.early_dropout * (1 - step / end)
