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
        matrices = [native.matrix(layer.fmt, layer.weight, getattr(layer, "scale", None), getattr(layer, "minimum", None),
                                  layer.in_features) for layer in layers]  # fmt: skip
        blocks.append(((native.Matrix * 5)(*matrices), (block.ln_1.weight, block.ln_2.weight)))
    model._native_blocks = (addresses, blocks)
    return blocks


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [B, H, D] against k, v [B, >=S, D] with bias [B, H, S] -> [B, H, D]."""
    if native.available() and q.shape[-1] in native.ATTENTION_HEAD_DIMS:
        return native.attention_one(q, k, v, bias)
    span = bias.shape[-1]
    scores = torch.baddbmm(bias, q, k[:, :span].transpose(1, 2), alpha=q.shape[-1] ** -0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v[:, :span])


@torch.inference_mode()
def decode_one(
    model: GPTRefactForCausalLM, ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [B, vocab] for one new token per row, ids [B], appended to each row's cached tokens.

    attention_mask ([B, cached span + 1]) marks real tokens as in the forward pass; None means all.
    """
    if not lean_path_applies(model):
        return model(ids[:, None], attention_mask=attention_mask, cache=cache)[:, -1]
    config = model.config
    batch, n_embd, eps = ids.shape[0], config.n_embd, config.layer_norm_epsilon
    span = cache.span + 1
    if span > cache.max_len:
        raise ValueError(f"KV cache overflow: {span} positions needed, {cache.max_len} allocated")
    if attention_mask is None:
        attention_mask = torch.ones(batch, span, dtype=torch.bool)
    positions = cache.lengths
    bias = attention_bias(model.alibi_slopes, positions[:, None], attention_mask).view(batch, config.n_head, span)
    slots = torch.arange(batch) * cache.max_len + positions  # where each row's new K/V goes, flattened

    x = model.transformer.wte(ids).to(model.dtype)
    blocks = native_blocks(model)
    if blocks is not None:  # the whole block in one native call
        shape, positions, bias = (config.n_head, config.head_dim, config.mlp_hidden), positions.contiguous(), bias.contiguous()
        for layer, (matrices, norms) in enumerate(blocks):
            native.decode_block(x, shape, norms, eps, matrices, cache.k[layer], cache.v[layer], positions, bias)
        cache.advance(1)
        return model.lm_head.forward(F.layer_norm(x, (n_embd,), model.ln_f.weight, None, eps))
    for layer, block in enumerate(model.transformer.h):
        attn, mlp = block.attn, block.mlp
        h = F.layer_norm(x, (n_embd,), block.ln_1.weight, None, eps)
        q = attn.q.forward(h).view(batch, config.n_head, config.head_dim)
        k_new, v_new = attn.kv.forward(h).split(config.head_dim, dim=-1)
        keys, values = cache.k[layer], cache.v[layer]
        keys.view(-1, config.head_dim).index_copy_(0, slots, k_new)
        values.view(-1, config.head_dim).index_copy_(0, slots, v_new)
        x = x + attn.c_proj.forward(attend(q, keys, values, bias).view(batch, n_embd))
        h = F.layer_norm(x, (n_embd,), block.ln_2.weight, None, eps)
        gate, up = mlp.gate_up_proj.forward(h).chunk(2, dim=-1)
        x = x + mlp.c_proj.forward(F.silu(gate) * up)
    cache.advance(1)
    return model.lm_head.forward(F.layer_norm(x, (n_embd,), model.ln_f.weight, None, eps))
