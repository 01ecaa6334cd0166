"""Next-token loss on held-out code: one number that compares any two models on the same tokens.

The trainer's own eval loss comes from its data's val split (files of the training packages, in
the run's FIM format), so two runs with different data or finetunes are not comparable by it.
This reads plain left-to-right text from files no run trained on, cut into the same blocks for
every model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from midfill.model import GPTRefactForCausalLM
from midfill.tokenizer import Tokenizer


def held_out_blocks(tok: Tokenizer, texts: list[str], block_size: int, blocks: int) -> torch.Tensor:
    """`blocks` windows of block_size + 1 tokens spread evenly over the texts joined by <|endoftext|>."""
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text) + [tok.eot_id]
    span = block_size + 1
    if len(ids) < span:
        raise ValueError(f"held-out texts have {len(ids)} tokens, fewer than one block of {span}")
    count = min(blocks, len(ids) // span)
    stride = (len(ids) - span) // max(count - 1, 1)
    return torch.tensor([ids[i * stride: i * stride + span] for i in range(count)])


@torch.no_grad()
def held_out_loss(model: GPTRefactForCausalLM, blocks: torch.Tensor, batch: int = 8) -> float:
    """Mean loss in nats per token over every position of every block (float32 logits)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        rows = blocks[start: start + batch].to(model.device)
        logits = model(rows[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
        count += rows[:, 1:].numel()
    return total / count
