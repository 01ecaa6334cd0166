"""Training batches: random windows of the packed token shards, FIM applied per document.

Every batch is a pure function of (seed, step, sample index): a resumed run, or one spread over
several processes, sees exactly the samples an uninterrupted single-process run would.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from midfill.data.fim import FimConfig, transform
from midfill.data.packing import TokenShards
from midfill.tokenizer import Tokenizer


def sample_seed(seed: int, step: int, index: int) -> int:
    return hash((seed, step, index)) & 0x7FFFFFFF


def fim_window(tokens: TokenShards, tok: Tokenizer, rng: random.Random, length: int, config: FimConfig) -> tuple[list[int], list[bool]]:
    """`length` tokens from a random place, each whole document in it FIM-transformed at random."""
    start = rng.randrange(max(len(tokens) - length, 1))
    window = tokens.window(start, min(length, len(tokens)))
    ends = (np.flatnonzero(window == tokens.eot_id) + 1).tolist()
    bounds = [0, *ends] + ([len(window)] if not ends or ends[-1] != len(window) else [])
    ids: list[int] = []
    mask: list[bool] = []
    for lo, hi in zip(bounds, bounds[1:]):
        piece = window[lo:hi].tolist()
        if piece[-1] == tokens.eot_id:
            doc_ids, doc_mask = transform(tok, tok.decode(piece[:-1]), rng, config)
        else:  # the window cut this document: keep it as it is
            doc_ids, doc_mask = piece, [True] * len(piece)
        ids += doc_ids
        mask += doc_mask
    ids, mask = ids[:length], mask[:length]
    pad = length - len(ids)  # FIM can make a window shorter than it was; pad, and learn nothing there
    return ids + [tok.fim_pad_id] * pad, mask + [False] * pad


def example_window(tokens: TokenShards, rng: random.Random, length: int) -> tuple[list[int], list[bool]]:
    """`length` tokens of ready-made examples from a random place, with their own target mask."""
    start = rng.randrange(max(len(tokens) - length, 1))
    n = min(length, len(tokens))
    ids, mask = tokens.window(start, n).tolist(), tokens.mask_window(start, n).tolist()
    return ids + [0] * (length - n), mask + [False] * (length - n)


def make_batch(
    tokens: TokenShards, tok: Tokenizer, seed: int, step: int, indices: range, block_size: int, config: FimConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs [B, T], targets [B, T] and loss mask [B, T] for samples `indices` of step `step`."""
    if tokens.masks is not None:
        rows = [example_window(tokens, random.Random(sample_seed(seed, step, i)), block_size + 1) for i in indices]
    else:
        rows = [fim_window(tokens, tok, random.Random(sample_seed(seed, step, i)), block_size + 1, config) for i in indices]
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]
