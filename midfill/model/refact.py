"""The GPTRefact network: ALiBi, multi-query attention, bias-free LayerNorm, SwiGLU, untied head.

Module and parameter names follow the released Hugging Face checkpoint exactly
(`transformer.h.{i}.attn.kv.weight`, top-level `ln_f`, ...), so its state dict loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from midfill.model.alibi import alibi_slopes, attention_bias
from midfill.model.config import RefactConfig
from midfill.model.flex_attention import attend, causal_block_mask
from midfill.model.kv_cache import KVCache
from midfill.model.quantize import PackedLinear, bf16_prompt

FlexBias = tuple[torch.Tensor, BlockMask]  # ALiBi slopes and causal block mask: the flex path's stand-in for a bias
Biases = list[torch.Tensor]  # one additive bias per query block (GPTRefactForCausalLM.block_biases)
QUERY_BLOCK = 128  # tokens of a long input attended per call, each block against the keys up to its own last token


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, biases: Biases) -> torch.Tensor:
    """SDPA of q [B, 1, T*H, hd] (heads folded into rows) against k, v [B, 1, S, hd], the last T keys
    being the queries' own tokens, in blocks of QUERY_BLOCK tokens that skip the keys after each block.

    An explicit bias leaves the kernel no causal structure to exploit, so one call over a whole
    512-token prompt spends half its work on keys every query is masked from; in four blocks that
    share is an eighth (the 1.6B shape on 2 Zen 4 cores: 16 -> 11 ms a layer). Hidden keys weigh
    exactly zero, so only the summation order of the kernel's blocks changes. biases holds each
    block's bias [B, 1, rows*H, keys] (block_biases).
    """
    outs, start = [], 0
    for bias in biases:
        rows, keys = bias.shape[2], bias.shape[3]
        outs.append(F.scaled_dot_product_attention(q[:, :, start : start + rows], k[:, :, :keys], v[:, :, :keys], attn_mask=bias))
        start += rows
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


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
    Given a FlexBias instead of a bias tensor, the heads stay heads and FlexAttention broadcasts K/V.
    """

    def __init__(self, config: RefactConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.fp32_softmax = config.attention_softmax_in_fp32
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kv = nn.Linear(config.n_embd, 2 * config.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self, x: torch.Tensor, bias: Biases | FlexBias, cache: KVCache | None, layer: int, upcast: bool = True
    ) -> torch.Tensor:
        """upcast=False (a bf16 prompt, quantize.bf16_prompt) attends in x's dtype with the float32 bias
        as it is: torch's CPU flash kernel keeps its scores and softmax in float32 anyway."""
        batch, n_tok, n_embd = x.shape
        k, v = self.kv(x).split(self.head_dim, dim=-1)
        if isinstance(bias, tuple):
            # contiguous: under torch.compile, torch 2.13's CPU flex template reads a transposed view's
            # storage as q's shape and fails; elsewhere it is one small copy per layer
            q = self.q(x).view(batch, n_tok, self.n_head, self.head_dim).transpose(1, 2).contiguous()
            out = attend(q, k[:, None], v[:, None], *bias).transpose(1, 2)
            return self.c_proj(out.reshape(batch, n_tok, n_embd))
        q = self.q(x).view(batch, 1, n_tok * self.n_head, self.head_dim)
        if cache is not None:
            k, v = (t.to(q.dtype) for t in cache.update(layer, k.to(cache.k.dtype), v.to(cache.k.dtype)))
        k, v = k[:, None], v[:, None]
        if self.fp32_softmax and upcast:
            q, k, v = q.float(), k.float(), v.float()
        if bias[0].dtype != q.dtype and upcast:  # clamp first, so masked entries stay finite in a narrower dtype
            bias = [b.clamp(min=torch.finfo(q.dtype).min).to(q.dtype) for b in bias]
        out = causal_attention(q, k, v, bias)
        return self.c_proj(out.to(x.dtype).view(batch, n_tok, n_embd))


class SwiGLU(nn.Module):
    def __init__(self, config: RefactConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return self.c_proj(F.silu(gate) * up)
        # without autograd the product overwrites the gate half: a 512-token prompt of the 1.6B model
        # keeps 11 MB fewer alive through the down projection
        return self.c_proj(F.silu(gate, inplace=True).mul_(up))


class Block(nn.Module):
    def __init__(self, config: RefactConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNormNoBias(config.n_embd, config.layer_norm_epsilon)
        self.attn = MultiQueryAttention(config)
        self.ln_2 = LayerNormNoBias(config.n_embd, config.layer_norm_epsilon)
        self.mlp = SwiGLU(config)

    def forward(
        self, x: torch.Tensor, bias: Biases | FlexBias, cache: KVCache | None, layer: int, dropout: float = 0.0,
        products: torch.dtype | None = None,
    ) -> torch.Tensor:
        """products: the dtype the attention and MLP compute in when it is not x's (a bf16 prompt)."""
        narrow = (lambda h: h.to(products)) if products is not None else (lambda h: h)
        x = x + F.dropout(self.attn(narrow(self.ln_1(x)), bias, cache, layer, products is None), dropout, self.training)
        return x + F.dropout(self.mlp(narrow(self.ln_2(x))), dropout, self.training)


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
        self.precision = None  # how load_model chose to run it, and why (midfill.model.precision.Precision)
        self.dropout = 0.0  # residual dropout while training; the trainer schedules it (early dropout)
        self.attention = "auto"  # "sdpa", "flex", or "auto": flex while training on a GPU (see uses_flex)

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

    def uses_flex(self, cache: KVCache | None, attention_mask: torch.Tensor | None) -> bool:
        """Whether a forward computes ALiBi inside a FlexAttention kernel instead of reading a bias tensor.

        Only a training-shaped forward can (no cache, no padding): its mask is plain causal. "auto"
        takes it while training on a GPU, where the [B, T*H, S] float32 bias costs memory and
        bandwidth; on a CPU flex has no backward pass, so there only `attention = "flex"` asks for it.
        """
        if cache is not None or attention_mask is not None or self.attention == "sdpa":
            return False
        return self.attention == "flex" or (self.training and self.device.type == "cuda")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        hidden_states: list[torch.Tensor] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for input_ids [B, T] ([B, 1, vocab] of the last position with last_only:
        a prefill needs no others, and the head is a large share of a prompt's work).

        attention_mask ([B, past+T], 1 = real token, 0 = padding) covers the cached positions too.
        With a cache, each row's new tokens are appended after that row's cached ones and attend
        to everything before them; rows may hold different lengths.
        If `hidden_states` is a list, the residual stream after the embedding and after each block
        is appended to it.
        """
        n_tok = input_ids.shape[1]
        if self.uses_flex(cache, attention_mask):
            bias: Biases | FlexBias = (self.alibi_slopes, causal_block_mask(n_tok, input_ids.device))
        else:
            bias = self.block_biases(input_ids, attention_mask, cache)

        products = torch.bfloat16 if bf16_prompt(self, input_ids.numel()) else None
        x = self.transformer.wte(input_ids).to(self.dtype)  # packed models keep the table narrower
        if hidden_states is not None:
            hidden_states.append(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, bias, cache, layer, self.dropout, products)
            if hidden_states is not None:
                hidden_states.append(x)
        if cache is not None:
            cache.advance(n_tok)
        return self.lm_head(self.ln_f(x[:, -1:] if last_only else x))

    def block_biases(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None) -> Biases:
        """The additive bias (ALiBi, causal, padding) of each QUERY_BLOCK of the input, [B, 1, rows*H, keys]
        with the heads folded into rows, over only the keys up to the block's last token: the layers
        share them, and a 512-token prompt of the 1.6B shape holds 20 MB of them instead of 32."""
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
        blocks = [(start, min(start + QUERY_BLOCK, n_tok)) for start in range(0, n_tok, QUERY_BLOCK)]
        return [attention_bias(self.alibi_slopes, query_pos[:, start:stop], attention_mask[:, : span - n_tok + stop])
                .view(batch, 1, (stop - start) * self.config.n_head, span - n_tok + stop) for start, stop in blocks]  # fmt: skip
