"""ALiBi for any head count, and left padding, against an independent float64 computation."""

import math

import pytest
import torch

import midfill
from midfill.model import KVCache, refact
from midfill.model.alibi import alibi_slopes
from tests.helpers import tiny_model


def reference_slopes(n_head: int) -> list[float]:
    """The formula from the reference, evaluated in float64 with floating-point log2."""
    def power_of_two_slopes(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two_slopes(closest)
    if closest != n_head:
        slopes += power_of_two_slopes(2 * closest)[0::2][: n_head - closest]
    return slopes


@pytest.mark.parametrize("n_head", [1, 2, 3, 4, 5, 6, 7, 12, 20, 24, 32, 48, 96])
def test_slopes_for_any_head_count(n_head):
    ours = alibi_slopes(n_head).double()
    assert torch.allclose(ours, torch.tensor(reference_slopes(n_head), dtype=torch.float64), rtol=1e-6, atol=0)


def test_slopes_for_32_heads_are_powers_of_two():
    assert torch.equal(alibi_slopes(32), torch.tensor([2.0 ** (-(h + 1) / 4) for h in range(32)]))


def float64_forward(model, ids: torch.Tensor) -> torch.Tensor:
    """The README's math written out plainly: per-head loops, HF-style bias m_h*(j+1), float64."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    H, hd, T = cfg.n_head, cfg.head_dim, ids.shape[1]
    slopes = torch.tensor(reference_slopes(H), dtype=torch.float64)

    def ln(x, w):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.layer_norm_epsilon) * w

    x = sd["transformer.wte.weight"][ids[0]]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        h = ln(x, sd[p + "ln_1.weight"])
        q = (h @ sd[p + "attn.q.weight"].T).view(T, H, hd)
        kv = h @ sd[p + "attn.kv.weight"].T
        k, v = kv[:, :hd], kv[:, hd:]
        heads = []
        for head in range(H):
            s = q[:, head] @ k.T / math.sqrt(hd) + slopes[head] * (torch.arange(T, dtype=torch.float64) + 1)
            s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            heads.append(s.softmax(-1) @ v)
        x = x + torch.cat(heads, -1) @ sd[p + "attn.c_proj.weight"].T
        g, u = (ln(x, sd[p + "ln_2.weight"]) @ sd[p + "mlp.gate_up_proj.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(g) * u) @ sd[p + "mlp.c_proj.weight"].T
    return ln(x, sd["ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("n_head", [3, 6, 4])
def test_non_power_of_two_heads_match_float64(n_head):
    model = tiny_model(n_head=n_head, n_embd=16 * n_head)
    ids = torch.randint(0, 512, (1, 21), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(ids)[0].double()
    assert (logits - float64_forward(model, ids)).abs().max().item() <= 1e-4


def test_left_padded_rows_equal_unpadded():
    model = tiny_model()
    gen = torch.Generator().manual_seed(3)
    short, long = torch.randint(1, 512, (1, 9), generator=gen), torch.randint(1, 512, (1, 17), generator=gen)
    padded = torch.cat([torch.zeros(1, 8, dtype=torch.long), short], dim=1)
    batch = torch.cat([padded, long])
    mask = torch.ones_like(batch)
    mask[0, :8] = 0
    with torch.no_grad():
        batched = model(batch, attention_mask=mask)
        alone_short, alone_long = model(short), model(long)
    assert torch.isfinite(batched).all()
    assert (batched[0, 8:] - alone_short[0]).abs().max().item() <= 1e-5
    assert (batched[1] - alone_long[0]).abs().max().item() <= 1e-5


def test_batched_generation_with_left_padding_equals_one_by_one():
    model = tiny_model(seed=5)
    prompts = [[7, 8, 9], [11, 12, 13, 14, 15, 16, 17], [20]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = midfill.generate(model, ids, max_new_tokens=12, attention_mask=mask, stop_ids=[])
    assert batched == [midfill.generate(model, p, max_new_tokens=12, stop_ids=[]) for p in prompts]


def test_long_inputs_attend_in_query_blocks_as_in_one_call(monkeypatch):
    """causal_attention splits a long input into query blocks, each against the keys up to its own
    last token: with blocks of 4 tokens (a ragged last one), over rows with different cached lengths
    and over left padding, the logits are those of one call; and they match float64."""
    model = tiny_model(n_head=4, n_embd=64)
    gen = torch.Generator().manual_seed(11)
    first, rest = torch.randint(1, 512, (2, 9), generator=gen), torch.randint(1, 512, (2, 13), generator=gen)
    padded = torch.cat([first, rest], dim=1)
    mask = torch.ones_like(padded)
    mask[0, :3] = 0

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        cache = KVCache.allocate(model.config, 2, 32, torch.float32, "cpu")
        with torch.no_grad():
            model(first[:1, :5], cache=cache.rows(0, 1))  # row 0 holds 5 tokens, row 1 holds 9
            model(first[1:], cache=cache.rows(1, 2))
            return model(rest, cache=cache), model(padded, attention_mask=mask)

    whole = run()
    monkeypatch.setattr(refact, "QUERY_BLOCK", 4)
    blocked = run()
    cache = KVCache.allocate(model.config, 2, 32, torch.float32, "cpu")
    cache.advance(9)  # each block's bias covers the keys up to its own last token, no further
    shapes = [tuple(b.shape) for b in model.block_biases(rest, None, cache)]
    assert shapes == [(2, 1, 4 * 4, 9 + 4), (2, 1, 4 * 4, 9 + 8), (2, 1, 4 * 4, 9 + 12), (2, 1, 1 * 4, 9 + 13)]
    assert (blocked[0] - whole[0]).abs().max().item() <= 1e-5
    assert (blocked[1][0, 3:] - whole[1][0, 3:]).abs().max().item() <= 1e-5
    assert (blocked[1][1] - whole[1][1]).abs().max().item() <= 1e-5
    assert (blocked[1][1].double() - float64_forward(model, padded[1:])).abs().max().item() <= 1e-4


def test_the_mlp_without_autograd_equals_it_with_autograd():
    """Without autograd SwiGLU overwrites its gate half in place; the values are those of the autograd path,
    bit for bit, and that path still trains."""
    mlp = tiny_model().transformer.h[0].mlp
    x = torch.randn(2, 5, mlp.gate_up_proj.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        inplace = mlp(x)
    trained = mlp(x)
    trained.sum().backward()
    assert torch.equal(inplace, trained.detach())
    assert mlp.gate_up_proj.weight.grad.abs().sum() > 0
