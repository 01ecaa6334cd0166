"""Token healing: which prefixes are healed, and the answer spells the backed-off text, then drops it."""

from __future__ import annotations

import threading

import pytest
import torch

from midfill.engine.assembler import TextAssembler
from midfill.engine.healing import RequiredPrefix, healing_wanted, token_bytes_of
from midfill.engine.request import Finished, GenerationRequest
from midfill.engine.sampling import SamplingParams
from midfill.engine.scheduler import Engine
from midfill.prompts import fim_prompt, fim_prompt_healed
from tests.helpers import tiny_model


@pytest.mark.parametrize("prefix, healed", [
    ("def f(x):\n    retu", True),  # inside a word
    ("def f(x):\n", True),  # a bare newline: the next line's indentation would have merged with it
    ("def f(x):\n    ", True),  # part of the indentation
    ("x = foo(", False),  # punctuation does not merge with a following word
    ("x = [1, 2]", False),
])
def test_which_prompts_get_a_healed_form(small_tokenizer, prefix, healed):
    for order in ("spm", "psm"):
        ids, healed_ids = fim_prompt_healed(small_tokenizer, prefix, "\nrest\n", order, budget=64)
        assert ids == fim_prompt(small_tokenizer, prefix, "\nrest\n", order, budget=64)
        assert (healed_ids is not None) == healed
        if healed_ids is not None:  # the same prompt without exactly one token: the prefix's last
            k = next(i for i, (a, b) in enumerate(zip(ids, healed_ids)) if a != b)
            assert ids[:k] + ids[k + 1 :] == healed_ids and prefix.endswith(small_tokenizer.decode([ids[k]]))


def pair_that_merges(tok) -> tuple[int, int]:
    """Two tokens whose text the tokenizer writes as one token."""
    for token_id in range(tok.vocab_size):
        text = tok.decode([token_id])
        if len(text) >= 3 and text.isalpha():
            for cut in range(1, len(text)):
                a, b = tok.encode(text[:cut]), tok.encode(text[cut:])
                if len(a) == 1 and len(b) == 1:
                    return a[0], b[0]
    raise AssertionError("no mergeable pair in this vocabulary")


def test_healing_is_wanted_only_when_the_first_token_would_merge(small_tokenizer):
    tok = small_tokenizer
    last, first = pair_that_merges(tok)
    assert healing_wanted(tok, last, first, frozenset({tok.eot_id})) == tok.decode([last])
    x, equals = tok.encode("x")[0], tok.encode(" =")[0]  # "x" then " =": the tokenizer's own boundary
    assert tok.encode("x =") == [x, equals] and healing_wanted(tok, x, equals, frozenset({tok.eot_id})) is None
    newline = tok.encode("\n")[0]  # a bare newline the model would end the answer after: heal
    assert healing_wanted(tok, newline, tok.eot_id, frozenset({tok.eot_id})) == "\n"
    assert healing_wanted(tok, x, tok.eot_id, frozenset({tok.eot_id})) is None
    padding = tok.vocab_size + 3  # a model's embedding padded past its tokenizer (Refact's 49,216) may predict one
    assert healing_wanted(tok, last, padding, frozenset({tok.eot_id})) is None and tok.token_bytes(padding) == b""


def test_consistent_tokens_are_exactly_those_that_can_spell_the_text(small_tokenizer):
    table = token_bytes_of(small_tokenizer)
    for required in [b"\n  ", b"ret", b"x", "é".encode()]:
        brute = {i for i in range(small_tokenizer.vocab_size) if i not in small_tokenizer.special_ids
                 and (b := small_tokenizer.token_bytes(i)) and (b.startswith(required) or required.startswith(b))}
        assert set(table.consistent(required)) == brute


def test_sampling_under_the_constraint_always_spells_the_required_text(small_tokenizer):
    rng = torch.Generator().manual_seed(0)
    for required in ["\n    ", "return", "a_b"]:
        for _ in range(20):
            constraint, spelled = RequiredPrefix(small_tokenizer, required), b""
            while not constraint.done:
                logits = constraint.mask(torch.randn(1, small_tokenizer.vocab_size, generator=rng))
                token = int(torch.multinomial(logits.softmax(-1), 1, generator=rng))
                spelled += small_tokenizer.token_bytes(token)
                constraint.advance(token)
            assert spelled.startswith(required.encode())


def test_the_assembler_drops_the_healed_text_before_applying_stop_rules(small_tokenizer):
    from midfill.engine.stops import StopRules

    assembler = TextAssembler(small_tokenizer, StopRules.for_mode("single-line"), skip="\n")
    ids = small_tokenizer.encode("\n    return x\nmore")
    text = "".join(assembler.push(i) for i in ids) + assembler.finish("length")
    assert text == "    return x" and assembler.finish_reason == "stop"  # the healed "\n" did not end the line


def run(engine, requests):
    results, done = {}, threading.Semaphore(0)
    for key, request in requests.items():
        def sink(event, key=key):
            if isinstance(event, Finished):
                results[key] = event.result
                done.release()
        engine.submit(request, sink)
    for _ in requests:
        assert done.acquire(timeout=60)
    return results


def test_a_healed_sequence_spells_the_backed_off_text_first_and_answers_without_it(small_tokenizer, monkeypatch):
    import midfill.engine.sequence as sequence

    recorded: list[RequiredPrefix] = []  # held, so no two requests' recorders share an id() or a slot

    class Recording(RequiredPrefix):  # what each request's first tokens spelled
        def advance(self, token):
            if not hasattr(self, "spelled"):
                self.spelled = b""
                recorded.append(self)
            self.spelled += self.tok.token_bytes(token)
            super().advance(token)

    monkeypatch.setattr(sequence, "RequiredPrefix", Recording)
    monkeypatch.setattr(sequence, "healing_wanted", lambda tok, last, first, stops: tok.decode([last]))  # always heal
    engine = Engine(tiny_model(seed=3), small_tokenizer, max_batch=4)
    engine.start()
    try:
        ids, healed_ids = fim_prompt_healed(small_tokenizer, "def add(a, b):\n    retu", "\n")
        backed_off = small_tokenizer.decode([next(a for a, b in zip(ids, healed_ids + [-1]) if a != b)])
        requests = {seed: GenerationRequest(ids, 8, SamplingParams(temperature=1.0, seed=seed), healed_prompt_ids=healed_ids)
                    for seed in range(6)}
        results = run(engine, requests)
    finally:
        engine.stop()
    assert len(recorded) == 6 and all(r.spelled.startswith(backed_off.encode()) for r in recorded)
    for r in results.values():  # the healed prompt ran, and every sampled token is in the result
        assert r.finish_reason != "error" and r.prompt_tokens == len(healed_ids)
        assert len(r.token_ids) == r.completion_tokens - (r.finish_reason == "eos")


def test_without_a_merge_the_healed_request_answers_exactly_as_the_plain_one(small_tokenizer, monkeypatch):
    import midfill.engine.sequence as sequence

    monkeypatch.setattr(sequence, "healing_wanted", lambda *args: None)  # the cut is where the tokenizer cuts
    engine = Engine(tiny_model(seed=3), small_tokenizer, max_batch=4, prefix_cache_mb=0)
    engine.start()
    try:
        ids, healed_ids = fim_prompt_healed(small_tokenizer, "def add(a, b):\n    retu", "\n")
        results = run(engine, {"plain": GenerationRequest(ids, 12), "healed": GenerationRequest(ids, 12, healed_prompt_ids=healed_ids)})
    finally:
        engine.stop()
    assert results["plain"].token_ids == results["healed"].token_ids and results["plain"].text == results["healed"].text
