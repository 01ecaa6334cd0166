"""Generation with the KV cache equals step-by-step full passes; streaming text equals the result."""

import pytest
import torch

import midfill
from midfill.engine import StopRules, TextAssembler, stream_text
from midfill.engine import sequence as sequence_module
from midfill.errors import MidfillError
from tests.helpers import tiny_model

PROMPT = [5, 17, 230, 99, 41, 7, 300]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_cached_greedy_equals_full_passes(model):
    assert midfill.generate(model, PROMPT, max_new_tokens=24, stop_ids=[]) == greedy_without_cache(model, PROMPT, 24)


def test_chunked_prefill_equals_single_pass(model, monkeypatch):
    prompt = list(range(1, 60))
    whole = midfill.generate(model, prompt, max_new_tokens=8, stop_ids=[])
    monkeypatch.setattr(sequence_module, "PREFILL_CHUNK", 7)
    assert midfill.generate(model, prompt, max_new_tokens=8, stop_ids=[]) == whole


def test_stop_id_ends_generation_and_is_excluded(model):
    full = midfill.generate(model, PROMPT, max_new_tokens=12, stop_ids=[])
    stop = full[5]
    cut = midfill.generate(model, PROMPT, max_new_tokens=12, stop_ids=[stop])
    assert cut == full[: full.index(stop)]


def test_tensor_and_list_inputs_agree(model):
    as_list = midfill.generate(model, PROMPT, max_new_tokens=6, stop_ids=[])
    assert midfill.generate(model, torch.tensor([PROMPT]), max_new_tokens=6, stop_ids=[]) == as_list
    assert midfill.generate(model, torch.tensor(PROMPT), max_new_tokens=6, stop_ids=[]) == as_list


def test_seeded_sampling_is_reproducible(model):
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, stop_ids=[])
    a = midfill.generate(model, PROMPT, seed=123, **kwargs)
    assert a == midfill.generate(model, PROMPT, seed=123, **kwargs)
    assert a != midfill.generate(model, PROMPT, seed=124, **kwargs)


def test_repetition_penalty_changes_greedy_choices(model):
    plain = midfill.generate(model, PROMPT, max_new_tokens=30, stop_ids=[])
    penalized = midfill.generate(model, PROMPT, max_new_tokens=30, repetition_penalty=3.0, stop_ids=[])
    assert penalized != plain
    assert len(set(penalized)) >= len(set(plain))


def test_context_overflow_is_a_clear_error(model):
    with pytest.raises(MidfillError, match="exceed the model's context of 256"):
        midfill.generate(model, list(range(1, 250)), max_new_tokens=10)


def test_stream_text_joins_to_the_final_text(model, small_tokenizer):
    prompt = small_tokenizer.encode("def add(a, b):\n    return")
    assembler = TextAssembler(small_tokenizer, StopRules())
    deltas = list(stream_text(model, prompt, assembler, max_new_tokens=20, stop_ids=[]))
    expected_ids = midfill.generate(model, prompt, max_new_tokens=20, stop_ids=[])
    assert assembler.token_ids == expected_ids
    assert "".join(deltas) == assembler.text == small_tokenizer.decode(expected_ids)
    assert assembler.finish_reason == "length"


def test_stream_text_stops_on_stop_id(model, small_tokenizer):
    prompt = small_tokenizer.encode("import os\n")
    ids = midfill.generate(model, prompt, max_new_tokens=10, stop_ids=[])
    assembler = TextAssembler(small_tokenizer)
    before_stop = ids[: ids.index(ids[3])]
    text = "".join(stream_text(model, prompt, assembler, max_new_tokens=10, stop_ids={ids[3]}))
    assert assembler.finish_reason == "stop"
    assert assembler.token_ids == before_stop
    assert text == small_tokenizer.decode(before_stop)
