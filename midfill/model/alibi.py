"""ALiBi: per-head linear attention biases instead of position embeddings."""

from __future__ import annotations

import torch


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes for any head count, in float32, as the Refact/BLOOM reference computes them.

    For the largest power of two n <= n_head, head h gets (2^(-8/n))^(h+1); when n_head is not a
    power of two the extra heads take the odd powers of 2^(-4/n) (every other slope of 2n heads).
    """
    if n_head < 1:
        raise ValueError(f"n_head must be positive, got {n_head}")
    n = 1 << (n_head.bit_length() - 1)  # largest power of two <= n_head, computed exactly
    base = 2.0 ** (-8.0 / n)
    slopes = [base ** (h + 1) for h in range(n)]
    extra_base = 2.0 ** (-4.0 / n)
    slopes += [extra_base ** (2 * k + 1) for k in range(n_head - n)]
    return torch.tensor(slopes, dtype=torch.float32)


def attention_bias(slopes: torch.Tensor, query_pos: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Additive float32 bias of shape [B, T, H, S]: ALiBi plus causal and padding masks.

    query_pos [B, T] holds each query's absolute position; keys sit at 0..S-1 with
    S = key_mask.shape[1]. The bias is -slope*(i-j), which differs from the reference's
    slope*(j+1) only by a per-row constant that softmax ignores; because it depends on i-j alone,
    a left-padded row attends exactly as the same row without padding. Masked entries get the
    most negative finite float, so a row with no visible key stays finite instead of NaN.
    """
    k_pos = torch.arange(key_mask.shape[1], device=key_mask.device)
    distance = (query_pos[:, :, None] - k_pos).to(torch.float32)  # [B, T, S]
    bias = -distance[:, :, None, :] * slopes.to(key_mask.device)[:, None]  # [B, T, H, S]
    visible = (k_pos <= query_pos[:, :, None]) & key_mask.bool()[:, None, :]  # [B, T, S]
    return bias.masked_fill_(~visible[:, :, None, :], torch.finfo(torch.float32).min)  # in place: a 512-token prompt's bias is 32 MB
