"""Training: configuration and presets, schedules, the trainer loop, checkpoints."""
