"""A preallocated key/value cache: one shared K/V head per layer, so 2*head_dim values per token."""

from __future__ import annotations

import torch

from midfill.model.config import RefactConfig


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, written in place.

    `length` is the number of positions filled; the model advances it after each forward pass.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k  # [n_layer, batch, max_len, head_dim]
        self.v = v
        self.length = 0

    @classmethod
    def allocate(
        cls,
        config: RefactConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> "KVCache":
        shape = (config.n_layer, batch, max_len, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v [B, T, hd] at the current position; return all keys and values so far."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, self.length : end] = k
        self.v[layer, :, self.length : end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]
