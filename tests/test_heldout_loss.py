"""Held-out loss: every model is scored on the same blocks, and the number is the plain next-token loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from midfill.eval.heldout_loss import held_out_blocks, held_out_loss
from midfill.model import GPTRefactForCausalLM, RefactConfig

TEXTS = ["def add(a, b):\n    return a + b\n" * 20, "import os\nprint(os.getcwd())\n" * 20]


def test_blocks_are_even_windows_of_the_joined_texts(small_tokenizer):
    ids = []
    for text in TEXTS:
        ids += small_tokenizer.encode(text) + [small_tokenizer.eot_id]
    blocks = held_out_blocks(small_tokenizer, TEXTS, block_size=16, blocks=4)
    assert blocks.shape == (4, 17)
    stride = (len(ids) - 17) // 3
    assert [b.tolist() for b in blocks] == [ids[i * stride: i * stride + 17] for i in range(4)]
    assert 3 * stride + 17 > len(ids) - 3  # the last block reaches the end
    assert torch.equal(blocks, held_out_blocks(small_tokenizer, TEXTS, block_size=16, blocks=4))
    with pytest.raises(ValueError, match="fewer than one block"):
        held_out_blocks(small_tokenizer, ["x"], block_size=4096, blocks=1)


def test_loss_is_the_mean_cross_entropy_over_all_positions(small_tokenizer):
    torch.manual_seed(0)
    model = GPTRefactForCausalLM(RefactConfig(vocab_size=small_tokenizer.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    blocks = held_out_blocks(small_tokenizer, TEXTS, block_size=16, blocks=5)
    with torch.no_grad():
        expected = F.cross_entropy(model(blocks[:, :-1]).flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert held_out_loss(model, blocks, batch=2) == pytest.approx(expected, rel=1e-5)
    assert held_out_loss(model, blocks, batch=2) == pytest.approx(math.log(small_tokenizer.vocab_size), rel=0.2)  # untrained: near uniform
