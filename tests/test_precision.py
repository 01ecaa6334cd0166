"""The default path: a checkpoint runs in its own precision, bf16 packed on a CPU, equal to its float32 math."""

import copy
import weakref

import pytest
import torch

import midfill
from midfill.errors import MidfillError
from midfill.kernels import native
from midfill.model import checkpoint
from midfill.model.checkpoint import save_model
from midfill.model.decode_step import decode_one
from midfill.model.kv_cache import KVCache
from midfill.model.packed_prefill import has_bf16_matrix_units, int8_product, int8_rows
from midfill.model.precision import choose_precision as choose
from midfill.model.precision import describe
from midfill.model.quantize import bf16_prompt, quantize_model
from tests.helpers import tiny_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
IDS = torch.tensor([[3, 101, 202, 303, 404, 1, 55, 66, 2] * 4])
needs_native = pytest.mark.skipif(not native.available(), reason="no native kernels on this machine (not x86-64 AVX2, or no compiler)")


@needs_native
def test_choices():
    bf16, f32 = torch.bfloat16, torch.float32

    def choose_precision(*args):
        chosen = choose(*args)
        return chosen.dtype, chosen.packed

    assert choose_precision(bf16, "auto", None, CPU) == (f32, "bf16")
    assert choose_precision(f32, "auto", None, CPU) == (f32, None)
    assert choose_precision(torch.float16, "auto", None, CPU) == (f32, None)  # exact, not narrowed
    assert choose_precision(f32, "bfloat16", None, CPU) == (f32, "bf16")
    assert choose_precision(bf16, "float32", None, CPU) == (f32, None)
    assert choose_precision(bf16, "auto", "int4", CPU) == (f32, "int4")
    assert choose_precision(bf16, "auto", None, CUDA) == (bf16, None)
    assert choose_precision(f32, "bfloat16", None, CUDA) == (bf16, None)
    with pytest.raises(MidfillError, match="unknown dtype 'fp8'"):
        choose_precision(bf16, "fp8", None, CPU)


def bf16_checkpoint(tmp_path):
    """A tiny model saved in bf16, and the float32 model with exactly those weights (the reference)."""
    model = tiny_model(seed=5, n_embd=128, n_head=4).to(torch.bfloat16)  # head size 32: the fused decode block
    save_model(model, tmp_path)
    return tmp_path, copy.deepcopy(model).float().eval()


@needs_native
def test_a_bf16_checkpoint_loads_packed_and_equals_its_float32_math(tmp_path):
    folder, reference = bf16_checkpoint(tmp_path)
    model = midfill.load_model(folder)
    assert (model.weight_format, model.dtype, model.transformer.wte.weight.dtype) == ("bf16", torch.float32, torch.bfloat16)
    assert "bf16 checkpoint" in model.precision.reason and describe(model)["decode"].startswith("native")
    with torch.no_grad():
        expected, prompt = reference(IDS), model(IDS)
    if has_bf16_matrix_units():  # the prompt went through bf16 matrix units: activations rounded to bf16
        torch.testing.assert_close(prompt, expected, rtol=2e-2, atol=2e-2)
    elif native.has_gemm_bf16():  # float32 products on the bf16 weights, summed in another order
        torch.testing.assert_close(prompt, expected, rtol=1e-5, atol=1e-5)
    else:  # each layer widened to float32: the same products as the reference, bit for bit
        assert torch.equal(prompt, expected)
    cache = KVCache.allocate(model.config, batch=1, max_len=IDS.shape[1], dtype=torch.float32, device="cpu")
    model(IDS[:, :-1], cache=cache)
    step = decode_one(model, IDS[:, -1], cache)  # one token: the native kernels, float32 activations
    close = 2e-2 if has_bf16_matrix_units() else 1e-4  # ... over a cache the prompt path filled (bf16 activations there)
    torch.testing.assert_close(step, expected[:, -1], rtol=close, atol=close)


@needs_native
def test_a_prompt_computes_in_bf16_only_on_packed_weights_and_matrix_units(tmp_path):
    folder, reference = bf16_checkpoint(tmp_path)
    model = midfill.load_model(folder)
    assert bf16_prompt(model, IDS.numel()) == has_bf16_matrix_units()
    assert not bf16_prompt(model, 16)  # a decode step or a short draft: the native kernels, float32
    assert bf16_prompt(quantize_model(copy.deepcopy(reference), "int8"), IDS.numel()) == has_bf16_matrix_units()
    assert not bf16_prompt(reference, IDS.numel())
    # prefilled in two chunks, the second over the float32 cache the first filled in bf16
    cache = KVCache.allocate(model.config, batch=1, max_len=IDS.shape[1], dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model(IDS[:, :18], cache=cache)
        chunked = model(IDS[:, 18:], cache=cache, last_only=True)[:, -1]
        whole = model(IDS, last_only=True)[:, -1]
    torch.testing.assert_close(chunked, whole, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(whole, reference(IDS)[:, -1], rtol=2e-2, atol=2e-2)


def test_float32_stays_for_exactness(tmp_path):
    folder, _ = bf16_checkpoint(tmp_path)
    model = midfill.load_model(folder, dtype="float32")
    assert model.weight_format is None and all(p.dtype == torch.float32 for p in model.parameters())


@needs_native
def test_loading_holds_one_stored_tensor_at_a_time(tmp_path, monkeypatch):
    """No whole-model intermediate: when a tensor is read from disk, every one read before it is
    either gone or is itself one of the model's tensors."""
    folder, _ = bf16_checkpoint(tmp_path)
    reads: list[weakref.ref] = []
    held: list[int] = []  # addresses of earlier reads still alive at each read
    original = checkpoint.read_safetensors

    def watched(path):
        def watch(entry):
            def read():
                held.extend(ref().data_ptr() for ref in reads if ref() is not None)
                tensor = entry.read()
                reads.append(weakref.ref(tensor))
                return tensor

            return checkpoint.StoredTensor(entry.shape, entry.dtype, read)

        return {name: watch(entry) for name, entry in original(path).items()}

    monkeypatch.setattr(checkpoint, "read_safetensors", watched)
    stored = len(original(folder / "model.safetensors"))
    for quantize in (None, "int8"):
        reads.clear(), held.clear()
        model = midfill.load_model(folder, quantize=quantize)
        assert model.weight_format == (quantize or "bf16") and len(reads) == stored
        assert set(held) <= {t.data_ptr() for t in model.state_dict().values()}


def test_int8_prompt_products_are_the_two_code_math():
    """The reference, written out: two int8 codes per activation, exact integer sums, then the scales."""
    torch.manual_seed(0)
    rows, weight = torch.randn(40, 96), torch.randint(-127, 128, (24, 96), dtype=torch.int8)
    weight_scale = torch.rand(24) / 100
    coarse, scale = int8_rows(rows)
    fine = torch.round((rows - coarse.float() * scale[:, None]) * (256 / scale[:, None])).clamp(-127, 127)
    sums = coarse.double() @ weight.double().T + fine.double() @ weight.double().T / 256
    expected = (sums * scale.double()[:, None] * weight_scale.double()[None, :]).float()
    torch.testing.assert_close(int8_product(rows, weight, weight_scale), expected, rtol=1e-6, atol=1e-7)
    exact = rows @ (weight.float() * weight_scale[:, None]).T  # float32 activations: as fine as int16
    assert (int8_product(rows, weight, weight_scale) - exact).abs().max() <= 1e-4 * exact.abs().max()
