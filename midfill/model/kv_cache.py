"""A preallocated key/value cache: one shared K/V head per layer, so 2*head_dim values per token."""

from __future__ import annotations

import torch

from midfill.model.config import RefactConfig


class KVCache:
    """Keys and values of the tokens seen so far, for every layer and row, written in place.

    Each row has its own length, so sequences of different lengths can decode in one batch; a
    row's tokens always start at position 0 (ALiBi needs no other alignment).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        self.k = k  # [n_layer, batch, max_len, head_dim]
        self.v = v
        self.lengths = lengths  # [batch] int64: positions filled in each row

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
        k, v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        return cls(k, v, torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def span(self) -> int:
        """Positions filled in the longest row."""
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows start..stop-1 that writes through to this cache."""
        return KVCache(self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k/v [B, T, hd] after each row's filled positions; return keys and values so far."""
        n_new = k.shape[1]
        end = self.span + n_new
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_len} allocated")
        positions = self.lengths[:, None] + torch.arange(n_new, device=k.device)
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[layer][rows, positions] = k
        self.v[layer][rows, positions] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n_tokens: int) -> None:
        self.lengths.add_(n_tokens)
