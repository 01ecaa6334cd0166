"""Choosing the next token: greedy, or sampling with temperature, top-k, top-p and a repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from midfill.errors import MidfillError

SEED_SPACE = 2**64  # torch seeds are 64-bit: any integer seed is taken modulo this
MIN_TEMPERATURE = 1e-6  # below this, sampling is argmax to float precision: sample greedily instead of dividing by ~0
MAX_REPETITION_PENALTY = 1e4  # beyond this the penalty only overflows the logits


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL-style: >1 discourages tokens already in the context
    seed: int | None = None  # fixes the sampling sequence for reproducible output

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise MidfillError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MidfillError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MidfillError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 / MAX_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise MidfillError(
                f"repetition_penalty must be in [{1 / MAX_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}], "
                f"got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


class Sampler:
    """Turns last-position logits [B, V] into next token ids [B], with its own seeded generator."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed % SEED_SPACE)

    def adjusted(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] as tokens are drawn from them: repetition penalty (`seen` [B, V] marks tokens
        already in each row's context), then for sampling temperature, top-k and top-p."""
        p = self.params
        logits = logits.float()
        if seen is not None and p.repetition_penalty != 1.0:
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if p.greedy:
            return logits
        # shifted so the best logit is 0: a small temperature then sends the others to -inf, never to nan
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Drop a token once the tokens ranked above it already cover top_p; the top one always stays.
            drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= p.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Next token ids [B] for last-position logits [B, V]."""
        logits = self.adjusted(logits, seen)
        if self.params.greedy:
            return logits.argmax(dim=-1)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator).squeeze(-1)
