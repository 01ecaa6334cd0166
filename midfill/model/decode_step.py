"""The lean one-token step: the model's forward pass for decoding, with as little work around the weights as possible.

Decoding a token should cost the time to read the weights, nothing more. The plain forward pass
pays for generality (any number of new tokens, module hooks, scattered cache writes, SDPA's setup
for one query); this step does the same math for exactly one new token per row: the ALiBi bias
is built once and the cache is written in place. With packed weights on a CPU each block is one
native call (norms, matrices, cache write, attention, SwiGLU: midfill/kernels/decode.c); otherwise
a Python loop of the same steps. Tests hold both equal to `model(ids[:, None], ...)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from midfill.kernels import native
from midfill.model.alibi import attention_bias
from midfill.model.kv_cache import KVCache
from midfill.model.quantize import PackedLinear
from midfill.model.refact import GPTRefactForCausalLM


def lean_path_applies(model: GPTRefactForCausalLM) -> bool:
    """The step runs float32 CPU models; anything else takes the plain forward pass."""
    return model.device.type == "cpu" and model.dtype == torch.float32 and not model.training


def native_blocks(model: GPTRefactForCausalLM) -> list[tuple] | None:
    """Per block, its packed matrices for decode.c plus its norms; None unless every block is packed.

    Building the ctypes descriptions costs ~1.5 ms for 32 layers, so they are kept on the model and
    rebuilt only when a packed tensor's address changes (repacked, moved, replaced).
    """
    config = model.config
    if not native.available() or config.head_dim not in native.ATTENTION_HEAD_DIMS:
        return None
    groups = [(b.attn.q, b.attn.kv, b.attn.c_proj, b.mlp.gate_up_proj, b.mlp.c_proj) for b in model.transformer.h]
    if not all(isinstance(layer, PackedLinear) for group in groups for layer in group):
        return None
    addresses = tuple(t.data_ptr() for group in groups for layer in group for t in layer._buffers.values())
    cached = getattr(model, "_native_blocks", None)
    if cached is not None and cached[0] == addresses:
        return cached[1]
    blocks = []
    for block, layers in zip(model.transformer.h, groups):
        matrices = [native.matrix(layer.fmt, layer.weight, *(getattr(layer, name, None) for name in ("scale", "minimum", "steps")),
                                  layer.in_features) for layer in layers]  # fmt: skip
        blocks.append(((native.Matrix * 5)(*matrices), (block.ln_1.weight, block.ln_2.weight)))
    model._native_blocks = (addresses, blocks)
    return blocks


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [R, H, D] against the keys and values of cache rows `rows` (k, v [B, >=S, D]), bias [R, H, S] -> [R, H, D]."""
    if native.available() and q.shape[-1] in native.ATTENTION_HEAD_DIMS:
        return native.attention_one(q, k, v, rows, bias)
    span = bias.shape[-1]
    k, v = k[:, :span].index_select(0, rows), v[:, :span].index_select(0, rows)
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=q.shape[-1] ** -0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v)


@torch.inference_mode()
def decode_one(
    model: GPTRefactForCausalLM, ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [B, vocab] for one new token per row, ids [B], appended to each row's cached tokens.

    attention_mask ([B, cached span + 1]) marks real tokens as in the forward pass; None means all.
    """
    logits = decode_rows(model, ids, torch.arange(ids.shape[0], device=ids.device), cache, attention_mask)
    cache.advance(1)
    return logits


@torch.inference_mode()
def decode_rows(
    model: GPTRefactForCausalLM, ids: torch.Tensor, rows: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [R, vocab] for R new tokens ids [R], token r appended to cache row rows[r] (non-decreasing).

    A row's tokens are consecutive, in order, after its cached ones: a draft being verified, each
    token seeing its row's cache and the tokens before it, computed exactly as if decoded one at a
    time. Their keys and values are written; cache.lengths is left to the caller, which keeps what
    it accepts. attention_mask ([R, span]) as for decode_one, which has one token per row.
    """
    offsets = torch.arange(rows.shape[0], device=rows.device) - torch.searchsorted(rows, rows)
    positions = cache.lengths[rows] + offsets
    span = int(positions.max()) + 1 if rows.numel() else 1
    if span > cache.max_len:
        raise ValueError(f"KV cache overflow: {span} positions needed, {cache.max_len} allocated")
    if not lean_path_applies(model):
        return forward_rows(model, ids, rows, offsets, cache, attention_mask)
    config = model.config
    count, n_embd, eps = ids.shape[0], config.n_embd, config.layer_norm_epsilon
    if attention_mask is None:
        attention_mask = torch.ones(count, span, dtype=torch.bool)
    bias = attention_bias(model.alibi_slopes, positions[:, None], attention_mask).view(count, config.n_head, span)
    slots = rows * cache.max_len + positions  # where each token's K/V goes, flattened

    x = model.transformer.wte(ids).to(model.dtype)
    blocks = native_blocks(model)
    if blocks is not None:  # the whole block in one native call
        shape, rows, positions, bias = (config.n_head, config.head_dim, config.mlp_hidden), rows.contiguous(), positions.contiguous(), bias.contiguous()
        for layer, (matrices, norms) in enumerate(blocks):
            native.decode_block(x, shape, norms, eps, matrices, cache.k[layer], cache.v[layer], rows, positions, bias)
        return model.lm_head.forward(F.layer_norm(x, (n_embd,), model.ln_f.weight, None, eps))
    for layer, block in enumerate(model.transformer.h):
        attn, mlp = block.attn, block.mlp
        h = F.layer_norm(x, (n_embd,), block.ln_1.weight, None, eps)
        q = attn.q.forward(h).view(count, config.n_head, config.head_dim)
        k_new, v_new = attn.kv.forward(h).split(config.head_dim, dim=-1)
        keys, values = cache.k[layer], cache.v[layer]
        keys.view(-1, config.head_dim).index_copy_(0, slots, k_new)
        values.view(-1, config.head_dim).index_copy_(0, slots, v_new)
        x = x + attn.c_proj.forward(attend(q, keys, values, rows, bias).view(count, n_embd))
        h = F.layer_norm(x, (n_embd,), block.ln_2.weight, None, eps)
        gate, up = mlp.gate_up_proj.forward(h).chunk(2, dim=-1)
        x = x + mlp.c_proj.forward(F.silu(gate) * up)
    return model.lm_head.forward(F.layer_norm(x, (n_embd,), model.ln_f.weight, None, eps))


def forward_rows(
    model: GPTRefactForCausalLM, ids: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, cache: KVCache,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """decode_rows through the plain forward pass (GPU, bf16 torch models): each cache row's tokens
    as one row of a [rows, T] batch, right-padded (causality hides the padding from real tokens)."""
    used, group = torch.unique_consecutive(rows, return_inverse=True)
    width = int(offsets.max()) + 1
    batch = torch.zeros(used.shape[0], width, dtype=ids.dtype, device=ids.device)
    batch[group, offsets] = ids
    if attention_mask is not None and width > 1:
        raise ValueError("decode_rows takes an attention mask only with one token per row")
    first, last = int(used[0]), int(used[-1]) + 1
    if not torch.equal(used, torch.arange(first, last, device=used.device)):
        raise ValueError("decode_rows needs the rows it decodes to be consecutive")
    view = cache.rows(first, last)
    lengths = view.lengths.clone()
    logits = model(batch, attention_mask=attention_mask, cache=view)
    view.lengths.copy_(lengths)
    return logits[group, offsets]
