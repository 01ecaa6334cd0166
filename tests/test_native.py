"""The native kernels, every variant this CPU runs, against their pure-torch references.

Each test runs once per variant (avx512vnni, avx512, avx2); the ones this machine cannot run are
skipped with the reason. MIDFILL_KERNELS picks the variant, as it does for a user.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from midfill.errors import MidfillError
from midfill.kernels import native
from midfill.model import KVCache, packed_prefill
from midfill.model.decode_step import decode_one, native_blocks
from midfill.model.quantize import FORMATS, PackedLinear, int4_levels, int8_levels, quantize_model

from .helpers import rounded_per_group, tiny_model


@pytest.fixture
def use_variant(monkeypatch):
    """Name a variant in MIDFILL_KERNELS, as a user would; the choice is undone after the test."""

    def use(name: str) -> None:
        monkeypatch.setenv(native.OVERRIDE, name)
        native.library.cache_clear()

    yield use
    native.library.cache_clear()  # the next caller sees the environment as monkeypatch restores it


@pytest.fixture(params=[v.name for v in native.VARIANTS])
def variant(request, use_variant) -> str:
    """Each variant in turn; skipped where this CPU or machine cannot run it."""
    name = request.param
    needs = next(v for v in native.VARIANTS if v.name == name).cpu_flags
    if name not in native.runnable_variants():
        pytest.skip(f"this CPU lacks {', '.join(f for f in needs if f not in native.cpu_flags())} for the {name} kernels")
    use_variant(name)
    if not native.available():
        pytest.skip("the native kernels could not be built here (no C compiler?)")
    return name


@functools.cache
def packed(fmt: str, n_out: int, n_in: int) -> PackedLinear:
    """A random layer packed once for all variants (int4 packing is the slow part of these tests)."""
    torch.manual_seed(n_in)
    return PackedLinear.pack(torch.randn(n_out, n_in) * 0.05, fmt)


@functools.cache
def packed_model(fmt: str):
    """Head size 32, so the native attention and block apply; int4 keeps blocks 0-1 in int8, block 2 is int4."""
    return quantize_model(tiny_model(0, n_embd=128, n_head=4, n_layer=3), fmt)


def product(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    """x times the layer's weight through the native kernel of its format."""
    if layer.fmt == "bf16":
        return native.linear_bf16(x, layer.weight)
    if layer.fmt == "int8":
        return native.linear_int8(x, layer.weight, layer.scale)
    return native.linear_int4(x, layer.weight, layer.scale, layer.minimum, layer.steps)


def test_the_library_is_the_variant_asked_for(variant):
    assert native.variant() == variant


def test_an_unknown_or_unrunnable_variant_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(native.OVERRIDE, "avx1024")
    with pytest.raises(MidfillError, match="not a kernel variant"):
        native.chosen_variant()
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset(native.VARIANTS[-1].cpu_flags))
    monkeypatch.setenv(native.OVERRIDE, native.VARIANTS[0].name)
    with pytest.raises(MidfillError, match="cannot run it"):
        native.chosen_variant()
    monkeypatch.delenv(native.OVERRIDE)
    assert native.chosen_variant() == native.VARIANTS[-1]


@pytest.mark.parametrize("fmt", FORMATS)
# odd n_out leaves one row out of the far-apart pairs; 352 = 11 int4 groups, a tail after whole vectors
# in both widths; 2112 runs past int8's 2048-weight integer blocks; 864 = 27 groups: int4 widens its scale
# codes a vector's width at a time, here one whole width (16 on AVX-512), one short and a tail after it
@pytest.mark.parametrize("n_out, n_in", [(73, 352), (24, 2112), (9, 864)])
def test_linear_matches_the_unpacked_reference(variant, fmt, n_out, n_in):
    layer = packed(fmt, n_out, n_in)
    x = torch.randn(native.MAX_ROWS + 3, n_in)  # one full call, then three rows
    # bf16: exact products, float32 sums in another order; int8 also rounds activations to int16 (per row);
    # int4 rounds them to int8 per group of 32 and is then the exact product of those with the weights
    expected = F.linear(rounded_per_group(x) if fmt == "int4" else x, layer.unpack())
    tolerance = {"bf16": 1e-5, "int8": 2e-4, "int4": 1e-5}[fmt]
    torch.testing.assert_close(product(layer, x), expected, rtol=0, atol=tolerance * expected.abs().max().item())


def test_int4_kernels_stay_within_a_percent_of_exact_activations(variant):
    """What rounding activations to int8 per group costs against exact float32 activations: within 1% of the
    largest output (4-bit weights are off by up to 1/30 of their range themselves)."""
    layer = packed("int4", 73, 352)
    x = torch.randn(native.MAX_ROWS, 352)
    exact = F.linear(x, layer.unpack())
    assert (product(layer, x) - exact).abs().max() <= 0.01 * exact.abs().max()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_row_comes_out_bit_for_bit_the_same_alone_and_in_any_batch(variant, fmt):
    """Each output is the same operations in the same order whatever the rows around it (decode.c)."""
    layer = packed(fmt, 73, 352)
    x = torch.randn(native.MAX_ROWS, 352)
    alone = torch.cat([product(layer, row[None]) for row in x])
    for rows in range(2, native.MAX_ROWS + 1):
        assert torch.equal(product(layer, x[:rows]), alone[:rows]), rows
    reordered = torch.randperm(native.MAX_ROWS)
    assert torch.equal(product(layer, x[reordered]), alone[reordered])


def test_integer_variants_agree_bit_for_bit(use_variant):
    """vpdpwssd and vpmaddwd + vpaddd are the same integer sums, so avx512vnni and avx512 agree exactly."""
    names = ["avx512vnni", "avx512"]
    if not set(names) <= set(native.runnable_variants()):
        pytest.skip("this CPU lacks AVX512-VNNI or AVX-512 F/BW/VL")
    x = torch.randn(3, 352)
    results = []
    for name in names:
        use_variant(name)
        results.append([product(packed(fmt, 73, 352), x) for fmt in ("int8", "int4")])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_attention_matches_softmax_attention(variant):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 64), torch.randn(3, 50, 64), torch.randn(3, 50, 64)
    bias = torch.randn(3, 8, 37)
    bias[1, :, 20:] = torch.finfo(torch.float32).min  # hidden keys
    span = bias.shape[-1]
    expected = torch.softmax(q @ k[:, :span].transpose(1, 2) / 8 + bias, -1) @ v[:, :span]
    torch.testing.assert_close(native.attention_one(q, k, v, torch.arange(q.shape[0]), bias), expected, rtol=1e-5, atol=1e-5)


def filled_cache(model, rows: int, prompt: int) -> KVCache:
    """A cache of `rows` copies of one row prefilled with the same random `prompt` tokens."""
    one = KVCache.allocate(model.config, 1, 32, torch.float32, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        model(ids, cache=one)
    expand = lambda t: t.expand(t.shape[0], rows, *t.shape[2:]).clone()  # noqa: E731
    return KVCache(expand(one.k), expand(one.v), one.lengths.expand(rows).clone())


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_block_takes_a_full_batch_row_for_row(variant, fmt):
    """MAX_ROWS rows through the native block equal the forward pass, and each row equals itself decoded alone.

    Alone and in the batch bit for bit: the rows here span the same cached positions; a batch spans its
    longest row, and attention blocks its positions by that span, so rows of other lengths agree to
    float32 rounding instead (test_quantize.py's decode-step tests cover those).
    """
    model = packed_model(fmt)
    assert native_blocks(model) is not None
    rows, prompt = native.MAX_ROWS, 6
    new = torch.randint(0, model.config.vocab_size, (rows,), generator=torch.Generator().manual_seed(4))
    batch_cache, reference_cache = filled_cache(model, rows, prompt), filled_cache(model, rows, prompt)
    with torch.inference_mode():
        got = decode_one(model, new, batch_cache)
        expected = model(new[:, None], cache=reference_cache)[:, -1]
    # int4 rounds activations to int8 per group: where the block's C LayerNorm and torch's differ in the last
    # float32 bit, a code may land one step away (a step is 1/127 of its group's largest value)
    tolerance = 3e-3 if fmt == "int4" else 1e-4
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(batch_cache.k, reference_cache.k, rtol=1e-3, atol=tolerance)
    for row in range(rows):
        alone = decode_one(model, new[row : row + 1], filled_cache(model, 1, prompt))
        assert torch.equal(alone[0], got[row]), row


@pytest.mark.parametrize("shape", [(17, 64, 5), (40, 96, 70), (3, 256, 257), (600, 32, 40)])
def test_prompt_product_on_bf16_weights(variant, shape):
    """prefill.c: float32 products on bf16 weights widened a block at a time equal torch's float32
    GEMM on the widened matrix (another summation order); AVX2 builds have no such kernel."""
    if not native.has_gemm_bf16():
        pytest.skip(f"the {variant} build multiplies prompts through torch (prefill.c needs AVX-512)")
    rows, n_in, n_out = shape
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, n_in), torch.randn(n_out, n_in).bfloat16()
    torch.testing.assert_close(native.gemm_bf16(x, weight), x @ weight.float().T, rtol=1e-5, atol=1e-5)


def awkward_weight() -> torch.Tensor:
    """Rows of different scales, an all-zero row, a constant group and an outlier: the cases a range search trips on."""
    torch.manual_seed(7)
    weight = torch.randn(96, 320) * torch.rand(96, 1)
    weight[3] = 0.0
    weight[5, :32] = 0.25
    weight[9, 40] = 6.0
    return weight


def test_int8_packing_equals_the_torch_reference(variant):
    """pack.c searches each row's scale as int8_levels does; only summation order differs."""
    weight = awkward_weight()
    q, scale = native.pack_int8(weight)
    reference_q, reference_scale = int8_levels(weight)
    torch.testing.assert_close(scale, reference_scale, rtol=1e-5, atol=0)
    assert (q == reference_q).float().mean() > 0.9999
    assert ((q.int() - reference_q.int()).abs() <= 1).all()


def test_int4_packing_equals_the_torch_reference(variant):
    """pack.c runs int4_levels' search group by group and codes each row as it does: with the candidates tried
    at float16 precision, summation order cannot tip the ranges, so the bytes, codes and steps are the same."""
    weight = awkward_weight()
    for ours, reference in zip(native.pack_int4(weight), int4_levels(weight)):
        assert ours.dtype == reference.dtype and torch.equal(ours, reference)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_widening_to_bf16_equals_the_torch_reference(variant, fmt):
    """A bf16 prompt's int8 layer is its levels, exactly; an int4 layer is unpack() rounded to bf16: bit for bit."""
    layer = packed(fmt, 73, 352)
    out = torch.full((73, 352), float("nan"), dtype=torch.bfloat16)
    native.widen_bf16(fmt, layer.weight, layer.scale, getattr(layer, "minimum", None), getattr(layer, "steps", None), out)
    reference = (layer.weight if fmt == "int8" else layer.unpack()).to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), reference.view(torch.int16))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_prompt_product_widened_in_tiles_equals_the_whole_layer_widened(variant, fmt, monkeypatch):
    """widened_bf16_product widens a few rows at a time (here 5 tiles, the last one short): every output
    column equals the product with the whole layer widened at once, and no tile is skipped."""
    layer = packed(fmt, 73, 352)
    monkeypatch.setattr(packed_prefill, "WIDEN_TILE_BYTES", 16 * 352 * 2)
    monkeypatch.setattr(packed_prefill._scratch, "buffer", None, raising=False)
    x = torch.randn(2, 24, 352).bfloat16()
    tiled = packed_prefill.widened_bf16_product(x, fmt, layer.weight, layer.scale, *(getattr(layer, name, None) for name in ("minimum", "steps")))
    whole = F.linear(x, (layer.weight if fmt == "int8" else layer.unpack()).to(torch.bfloat16))
    assert tiled.shape == (2, 24, 73)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=0)
