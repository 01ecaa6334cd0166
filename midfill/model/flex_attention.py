"""ALiBi attention for training as one FlexAttention kernel: the bias -slope_h * (i - j) is computed
inside the kernel from (head, query index, key index) instead of being read from a [B, T*H, S]
float32 tensor, and blocks above the diagonal are skipped rather than masked.

Only a forward without a KV cache or padding takes this path (see GPTRefactForCausalLM.attention).
On CUDA the kernel is compiled (uncompiled flex materializes the full score matrix). torch 2.13's
FlexAttention has no backward pass on CPU, compiled or not; there its forward serves as a
reference for tests, eager by default, compiled only inside a model that torch.compile wraps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def causal(batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=8)
def causal_block_mask(n_tok: int, device: torch.device) -> BlockMask:
    """The causal mask of an n_tok window, shared by every batch row and head; made once per length
    (a run's steps all have the same one), not on every forward."""
    return create_block_mask(causal, None, None, n_tok, n_tok, device=device)


def alibi_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                         block_mask: BlockMask) -> torch.Tensor:  # fmt: skip
    """Attention output [B, H, T, hd] for q [B, H, T, hd] and the single K/V head k, v [B, 1, T, hd].

    enable_gqa lets every query head read the one K/V head without a copy. Scores and softmax stay
    in float32 inside the kernel whatever q's dtype, so attention_softmax_in_fp32 holds without
    upcasting q, k and v (flex does not follow autocast: they reach it in the dtype they come in).
    """

    def alibi(score: torch.Tensor, batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor,
              kv_idx: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return score - slopes[head] * (q_idx - kv_idx)

    return flex_attention(q, k, v, score_mod=alibi, block_mask=block_mask, enable_gqa=True)


@functools.cache
def compiled() -> Callable[..., torch.Tensor]:
    """alibi_flex_attention compiled, made on first use: torch.compile imports the compiler stack
    (about a second), which inference never needs. One fixed shape per run, so dynamic=False."""
    return torch.compile(alibi_flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """alibi_flex_attention, compiled on CUDA; eager elsewhere (or traced by an enclosing torch.compile)."""
    kernel = compiled() if q.is_cuda and not torch.compiler.is_compiling() else alibi_flex_attention
    return kernel(q, k, v, slopes, block_mask)
