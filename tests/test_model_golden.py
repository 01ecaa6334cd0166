"""The network against the golden vectors made with the Refact authors' own code."""

import pytest
import torch

import midfill
from midfill.model import GPTRefactForCausalLM, KVCache, RefactConfig

TOL = 1e-4


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    return midfill.load_model(golden_dir)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("case", ["len1", "len7", "len33_batch2"])
def test_logits_match_reference(golden_model, golden_expected, case):
    with torch.no_grad():
        logits = golden_model(golden_expected[f"{case}.input_ids"])
    assert logits.shape == golden_expected[f"{case}.logits"].shape
    assert max_diff(logits, golden_expected[f"{case}.logits"]) <= TOL


def test_hidden_states_match_reference(golden_model, golden_expected):
    hidden: list[torch.Tensor] = []
    with torch.no_grad():
        golden_model(golden_expected["len7.input_ids"], hidden_states=hidden)
    assert max_diff(torch.stack(hidden), golden_expected["len7.hidden_states"]) <= TOL


def test_alibi_slopes_match_reference(golden_model, golden_expected):
    assert torch.equal(golden_model.alibi_slopes, golden_expected["alibi_slopes"])


def test_cached_decode_matches_reference_steps(golden_model, golden_expected):
    prompt = golden_expected["generate.prompt_ids"]
    generated = golden_expected["generate.generated_ids"][0]
    cache = KVCache.allocate(golden_model.config, 1, 32, torch.float32, "cpu")
    steps = []
    with torch.no_grad():
        steps.append(golden_model(prompt, cache=cache)[:, -1])
        for token in generated[:-1]:
            steps.append(golden_model(token.view(1, 1), cache=cache)[:, -1])
    steps = torch.stack(steps, dim=1)
    assert max_diff(steps, golden_expected["generate.step_logits"]) <= TOL
    nocache = golden_expected["generate.full_logits_nocache"][:, 8:18]
    assert max_diff(steps, nocache) <= TOL


def test_no_cache_pass_over_full_sequence(golden_model, golden_expected):
    with torch.no_grad():
        logits = golden_model(golden_expected["generate.full_ids"])
    assert max_diff(logits, golden_expected["generate.full_logits_nocache"]) <= TOL


def test_greedy_ids_exactly_equal(golden_model, golden_expected):
    ids = midfill.generate(golden_model, golden_expected["generate.prompt_ids"], max_new_tokens=10, stop_ids=[])
    assert ids == golden_expected["generate.generated_ids"][0].tolist()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_reference(golden_dir, golden_expected, dtype):
    model = midfill.load_model(golden_dir, dtype=dtype)
    if model.weight_format is None:
        assert model.dtype == getattr(torch, dtype)
    else:  # bfloat16 on a CPU with the native kernels: bf16 weights packed, float32 activations
        assert (dtype, model.weight_format, model.dtype) == ("bfloat16", "bf16", torch.float32)
    with torch.no_grad():
        logits = model(golden_expected["len33_batch2.input_ids"])
    expected = golden_expected["len33_batch2.logits"]
    assert max_diff(logits, expected) <= 5e-2 * expected.abs().max().item()
    agree = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree >= 0.95


def test_real_config_parameter_count():
    with torch.device("meta"):
        model = GPTRefactForCausalLM(RefactConfig(vocab_size=49216, n_embd=2048, n_layer=32, n_head=32))
    assert model.config.mlp_hidden == 5632
    assert model.num_parameters() == 1_585_842_176


@pytest.mark.parametrize(("n_embd", "n_inner", "hidden"), [(64, None, 256), (2048, None, 5632), (64, 96, 256), (512, 3000, 2048)])
def test_mlp_width_derived_as_reference(n_embd, n_inner, hidden):
    assert RefactConfig(n_embd=n_embd, n_head=4, n_inner=n_inner).mlp_hidden == hidden


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu(golden_dir, golden_expected):
    model = midfill.load_model(golden_dir, device="cuda")
    with torch.no_grad():
        logits = model(golden_expected["len7.input_ids"].cuda()).cpu()
    assert max_diff(logits, golden_expected["len7.logits"]) <= 1e-3
