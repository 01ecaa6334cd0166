"""Training checkpoints: one file with everything a resumed run needs, written atomically."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from midfill.errors import MidfillError
from midfill.files import atomic_path

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
TRAINED = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)  # a LoRA run: its adapter


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any], write: bool) -> None:
    """Gather the trained weights and the optimizer state (a collective under FSDP); `write` on one rank only."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=TRAINED)
    if not write:
        return
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: Path, config) -> dict[str, Any] | None:
    """The checkpoint at `path`, if there is one, once it is known to come from a run with `config`'s settings."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: it holds RNG states
    try:
        same = type(config)(**state["config"]).to_dict() == config.to_dict()  # settings added later take defaults
    except (TypeError, MidfillError):
        same = False
    if not same:
        raise MidfillError(f"{path.parent}: holds a run with other settings; use another output folder or the same settings")
    return state


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put a checkpoint's weights, optimizer state and RNG states back."""
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=TRAINED)
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
