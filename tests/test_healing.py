"""Token healing: which prefixes are healed, and the answer spells the backed-off text, then drops it."""

from __future__ import annotations

import threading

import pytest
import torch

from midfill.engine.assembler import TextAssembler
from midfill.engine.healing import RequiredPrefix, token_bytes_of
from midfill.engine.request import Finished, GenerationRequest
from midfill.engine.sampling import SamplingParams
from midfill.engine.scheduler import Engine
from midfill.prompts import fim_prompt, fim_prompt_healed, healing_cut
from tests.helpers import tiny_model


@pytest.mark.parametrize("prefix, healed", [
    ("def f(x):\n    retu", True),  # inside a word
    ("def f(x):\n", True),  # a bare newline: the next line's indentation would have merged with it
    ("def f(x):\n    ", True),  # part of the indentation
    ("x = foo(", False),  # punctuation does not merge with a following word
    ("x = [1, 2]", False),
])
def test_which_prefixes_are_healed(small_tokenizer, prefix, healed):
    cut = healing_cut(small_tokenizer, prefix)
    assert bool(cut) == healed
    if cut:  # the cut is the prefix's own last token, so the healed prompt is the plain one minus that token
        assert prefix.endswith(cut)
        assert small_tokenizer.encode(prefix[: -len(cut)]) + small_tokenizer.encode(cut) == small_tokenizer.encode(prefix)
        assert fim_prompt_healed(small_tokenizer, prefix, "\n")[0] == fim_prompt(small_tokenizer, prefix[: -len(cut)], "\n")
    else:
        assert fim_prompt_healed(small_tokenizer, prefix, "\n") == (fim_prompt(small_tokenizer, prefix, "\n"), "")


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


def test_the_engine_spells_the_healed_text_first_and_answers_without_it(small_tokenizer, monkeypatch):
    import midfill.engine.sequence as sequence

    spelled: list[bytes] = []

    class Recording(RequiredPrefix):  # what each request's first tokens spelled
        def __init__(self, tok, text):
            super().__init__(tok, text)
            spelled.append(b"")
            self.index = len(spelled) - 1

        def advance(self, token):
            spelled[self.index] += self.tok.token_bytes(token)
            super().advance(token)

    monkeypatch.setattr(sequence, "RequiredPrefix", Recording)
    engine = Engine(tiny_model(seed=3), small_tokenizer, max_batch=4)
    engine.start()
    try:
        results, done = [], threading.Semaphore(0)

        def sink(event):
            if isinstance(event, Finished):
                results.append(event.result)
                done.release()

        ids, healed = fim_prompt_healed(small_tokenizer, "def add(a, b):\n    retu", "\n")
        assert healed
        for seed in range(6):
            engine.submit(GenerationRequest(ids, 8, SamplingParams(temperature=1.0, seed=seed), required_prefix=healed), sink)
        for _ in range(6):
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert len(spelled) == 6 and all(s.startswith(healed.encode()) for s in spelled)
    assert all(r.finish_reason != "error" for r in results)
