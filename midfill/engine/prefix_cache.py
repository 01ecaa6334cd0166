"""Reuse of the KV of recent prompts: the keystroke case, where the next prompt extends the last.

ALiBi keys carry no position, so the KV of a token prefix is valid for any prompt that starts
with the same tokens, wherever it was computed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class CachedPrefix:
    tokens: torch.Tensor  # [n] int64, on the KV's device
    k: torch.Tensor  # [n_layer, n, head_dim]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.tokens.nbytes


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    mismatch = (a[:n] != b[:n]).nonzero()
    return int(mismatch[0]) if len(mismatch) else n


class PrefixCache:
    """Least-recently-used store of token sequences with their KV, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, CachedPrefix] = OrderedDict()
        self.nbytes = 0
        self._next_key = 0

    def lookup(self, tokens: torch.Tensor) -> tuple[int, CachedPrefix | None]:
        """The longest cached prefix of `tokens`: its length and the entry holding it."""
        best_len, best_key = 0, None
        for key, entry in self.entries.items():
            n = common_prefix_length(entry.tokens, tokens)
            if n > best_len:
                best_len, best_key = n, key
        if best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        return best_len, self.entries[best_key]

    def insert(self, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep (copies of) tokens and their KV; entries that are a prefix of them are dropped."""
        if self.max_bytes <= 0 or len(tokens) == 0:
            return
        for key, entry in list(self.entries.items()):
            n = common_prefix_length(entry.tokens, tokens)
            if n == len(tokens):  # already covered by a longer or equal entry
                self.entries.move_to_end(key)
                return
            if n == len(entry.tokens):
                self._remove(key)
        entry = CachedPrefix(tokens.clone(), k.clone(), v.clone())
        if entry.nbytes > self.max_bytes:
            return
        self.entries[self._next_key] = entry
        self.nbytes += entry.nbytes
        self._next_key += 1
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self.entries)))

    def _remove(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes
