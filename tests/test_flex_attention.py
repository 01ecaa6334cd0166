"""The FlexAttention path (ALiBi computed inside the kernel) against the bias-tensor SDPA path:
same logits, same gradients, for head counts that are not powers of two and lengths that are not
multiples of flex's 128-token blocks. Inference keeps the SDPA path."""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import midfill.model.flex_attention as flex
from midfill.model import KVCache
from tests.helpers import tiny_model

SHAPES = [(1, 21), (4, 130), (6, 200)]  # (n_head, tokens)
TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():  # eager flex warns that it is unfused: here that is the point
        warnings.simplefilter("ignore", UserWarning)
        yield


def dense_flex_with_backward(q, k, v, score_mod, block_mask, enable_gqa):
    """torch's own unfused flex math, the same higher-order op the public function runs, called
    directly: the public flex_attention refuses a backward on CPU and asks the op for no logsumexp,
    which its backward needs. Private API, used only here, to check the flex path's gradients on CPU."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op

    options = {"BACKEND": "AUTO", "PRESCALE_QK": False, "ROWS_GUARANTEED_SAFE": False, "BLOCKS_ARE_CONTIGUOUS": False,
               "WRITE_DQ": True, "OUTPUT_LOGSUMEXP": True, "OUTPUT_MAX": False}  # fmt: skip

    def op(*args):
        return flex_op(*args)

    out, _, _ = torch.compile(op, backend="eager", fullgraph=True)(
        q, k, v, score_mod, block_mask.as_tuple(), 1 / math.sqrt(q.shape[-1]), options
    )
    return out


def model_for(n_head: int):
    model = tiny_model(n_head=n_head, n_embd=16 * n_head)
    assert not model.uses_flex(None, None)  # auto: not on a CPU
    return model


@pytest.mark.parametrize("n_head,n_tok", SHAPES)
def test_flex_logits_equal_sdpa(n_head, n_tok):
    model = model_for(n_head)
    ids = torch.randint(0, 512, (2, n_tok), generator=torch.Generator().manual_seed(n_tok))
    with torch.no_grad():
        model.attention = "sdpa"
        expected = model(ids)
        model.attention = "flex"
        assert model.uses_flex(None, None)
        torch.testing.assert_close(model(ids), expected, **TOL)


def logits_and_grads(model, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("n_head,n_tok", SHAPES)
def test_flex_gradients_equal_sdpa(n_head, n_tok, monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setattr(flex, "flex_attention", dense_flex_with_backward)
    model = model_for(n_head).to(device).train()  # dropout stays 0: the paths must see the same network
    gen = torch.Generator().manual_seed(n_head)
    ids, targets = (torch.randint(0, 512, (2, n_tok), generator=gen).to(device) for _ in range(2))
    model.attention = "sdpa"
    expected_logits, expected_grads = logits_and_grads(model, ids, targets)
    model.attention = "flex"
    logits, grads = logits_and_grads(model, ids, targets)
    torch.testing.assert_close(logits, expected_logits, **TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOL, msg=lambda m: f"{name}: {m}")


def test_inference_stays_on_the_bias_path():
    model = tiny_model()
    model.attention = "flex"
    cache = KVCache.allocate(model.config, 1, 8, torch.float32, "cpu")
    assert not model.uses_flex(cache, None)
    assert not model.uses_flex(None, torch.ones(1, 8, dtype=torch.long))
    model.attention = "sdpa"
    assert not model.uses_flex(None, None)


def test_causal_block_mask_matches_the_bias_mask():
    mask = flex.causal_block_mask(130, torch.device("cpu"))
    dense = mask.to_dense()  # [1, 1, q blocks, kv blocks]: the blocks the kernel visits
    assert dense.shape[-2:] == (2, 2) and dense[0, 0].tolist() == [[1, 0], [1, 1]]


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on a CPU needs a C++ compiler")
def test_compiled_flex_logits_equal_sdpa():
    """Inductor's C++ flex kernel (forward only on CPU), inside blocks compiled as the trainer does."""
    from midfill.train.trainer import compile_blocks

    model = model_for(6)
    ids = torch.randint(0, 512, (2, 130), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
        model.attention = "flex"
        compile_blocks(model)
        torch.testing.assert_close(model(ids), expected, **TOL)
