"""Training checkpoints: one file with everything a resumed run needs, written atomically."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from midfill.files import atomic_path

CHECKPOINT = "checkpoint.pt"
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any], write: bool) -> None:
    """Gather full model and optimizer state (a collective under FSDP); `write` on one rank only."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=FULL)
    if not write:
        return
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        **extra,
    }
    with atomic_path(folder / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore model, optimizer and RNG state from `folder`, if it has a checkpoint; return the rest."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: it holds RNG states
    set_state_dict(model, optimizer, model_state_dict=state.pop("model"), optim_state_dict=state.pop("optimizer"), options=FULL)
    rng = state.pop("rng")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
