"""The GPTRefact network: ALiBi, multi-query attention, bias-free LayerNorm, SwiGLU, untied head.

Module and parameter names follow the released Hugging Face checkpoint exactly
(`transformer.h.{i}.attn.kv.weight`, top-level `ln_f`, ...), so its state dict loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from midfill.model.alibi import alibi_slopes, attention_bias
from midfill.model.config import RefactConfig
from midfill.model.kv_cache import KVCache
from midfill.model.quantize import PackedLinear


class LayerNormNoBias(nn.Module):
    """Mean-and-variance LayerNorm with a weight and no bias (not RMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, None, self.eps)


class MultiQueryAttention(nn.Module):
    """All query heads share one key/value head.

    The heads are folded into the query rows ([B, 1, T*H, hd]) so one K/V head of shape
    [B, 1, S, hd] serves them all in a single attention call, with no repeated K/V in memory.
    """

    def __init__(self, config: RefactConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.fp32_softmax = config.attention_softmax_in_fp32
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kv = nn.Linear(config.n_embd, 2 * config.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        batch, n_tok, n_embd = x.shape
        q = self.q(x).view(batch, 1, n_tok * self.n_head, self.head_dim)
        k, v = self.kv(x).split(self.head_dim, dim=-1)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        k, v = k[:, None], v[:, None]
        if self.fp32_softmax:
            q, k, v = q.float(), k.float(), v.float()
        if bias.dtype != q.dtype:  # clamp first, so masked entries stay finite in a narrower dtype
            bias = bias.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.c_proj(out.to(x.dtype).view(batch, n_tok, n_embd))


class SwiGLU(nn.Module):
    def __init__(self, config: RefactConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: RefactConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNormNoBias(config.n_embd, config.layer_norm_epsilon)
        self.attn = MultiQueryAttention(config)
        self.ln_2 = LayerNormNoBias(config.n_embd, config.layer_norm_epsilon)
        self.mlp = SwiGLU(config)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, cache: KVCache | None, layer: int, dropout: float = 0.0
    ) -> torch.Tensor:
        x = x + F.dropout(self.attn(self.ln_1(x), bias, cache, layer), dropout, self.training)
        return x + F.dropout(self.mlp(self.ln_2(x)), dropout, self.training)


class Transformer(nn.Module):
    """Token embedding and the blocks: the part named `transformer.*` in the checkpoint."""

    def __init__(self, config: RefactConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))


class GPTRefactForCausalLM(nn.Module):
    def __init__(self, config: RefactConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.ln_f = LayerNormNoBias(config.n_embd, config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)
        self.source: str | None = None  # the folder it was loaded from, for reports
        self.weight_format: str | None = None  # bf16/int8/int4 once midfill.model.quantize packed it
        self.dropout = 0.0  # residual dropout while training; the trainer schedules it (early dropout)

    @property
    def device(self) -> torch.device:
        return self.ln_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype; packed linear weights (midfill.model.quantize) have their own format."""
        return self.ln_f.weight.dtype

    def num_parameters(self) -> int:
        """Weights of the network however they are stored (packed layers keep theirs as buffers)."""
        packed = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, PackedLinear))
        return packed + sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for input_ids [B, T].

        attention_mask ([B, past+T], 1 = real token, 0 = padding) covers the cached positions too.
        With a cache, each row's new tokens are appended after that row's cached ones and attend
        to everything before them; rows may hold different lengths.
        If `hidden_states` is a list, the residual stream after the embedding and after each block
        is appended to it.
        """
        batch, n_tok = input_ids.shape
        offsets = torch.arange(n_tok, device=input_ids.device)
        if cache is None:
            query_pos, span = offsets.expand(batch, n_tok), n_tok
        else:
            query_pos, span = cache.lengths[:, None] + offsets, cache.span + n_tok
        if attention_mask is None:
            attention_mask = torch.ones(batch, span, dtype=torch.bool, device=input_ids.device)
        elif attention_mask.shape != (batch, span):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, span)} "
                "(batch, cached + new tokens)"
            )
        bias = attention_bias(self.alibi_slopes, query_pos, attention_mask)
        bias = bias.view(batch, 1, n_tok * self.config.n_head, span)

        x = self.transformer.wte(input_ids)
        if hidden_states is not None:
            hidden_states.append(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, bias, cache, layer, self.dropout)
            if hidden_states is not None:
                hidden_states.append(x)
        if cache is not None:
            cache.advance(n_tok)
        return self.lm_head(self.ln_f(x))
