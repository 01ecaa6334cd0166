"""One FIM layout: a training example cut at a cursor is, token for token, the inference prompt for
the same prefix and suffix, then the middle's ids and <|endoftext|> (pretraining FIM and synthetic
finetune examples, SPM and PSM)."""

from __future__ import annotations

import random

import pytest

from midfill.data.fim import FimConfig, choose_cut, fim_example, transform
from midfill.data.fim_synth import DEFAULT_KINDS, FimExample, SynthConfig, example_tokens, synthesize
from midfill.prompts import fim_layout, fim_prompt, fim_prompt_psm, fim_prompt_spm
from tests.helpers import stdlib_texts

TEXTS = stdlib_texts(12)
PROMPT_BUILDERS = {"spm": fim_prompt_spm, "psm": fim_prompt_psm}


def expected_example(tok, order: str, prefix: str, middle: str, suffix: str) -> list[int]:
    prompt = fim_prompt(tok, prefix, suffix, order)
    assert prompt == PROMPT_BUILDERS[order](tok, prefix, suffix)
    return prompt + tok.encode(middle) + [tok.eot_id]


def cursors(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prefix, middle, suffix) of real modules, cut at random line-aware and character cursors."""
    rng = random.Random(seed)
    cuts = []
    for _ in range(n):
        text = rng.choice(TEXTS)
        start = rng.randrange(len(text))
        line_end = text.find("\n", start) + 1 or len(text)  # the rest of the line, or a span of any length
        end = line_end if rng.random() < 0.5 else rng.randint(start, len(text))
        cuts.append((text[:start], text[start:end], text[end:]))
    return cuts


@pytest.mark.parametrize("order", ["spm", "psm"])
def test_pretraining_example_is_the_inference_prompt_then_the_middle(small_tokenizer, order):
    tok = small_tokenizer
    for prefix, middle, suffix in cursors(40):
        ids, mask = fim_example(tok, prefix, middle, suffix, spm=order == "spm")
        assert ids == expected_example(tok, order, prefix, middle, suffix)
        answer = len(tok.encode(middle)) + 1
        assert all(mask[-answer:])  # the middle and its <|endoftext|> are targets
        assert mask[0] is False  # the prompt's first token is a marker (SPM's <|endoftext|>, PSM's <fim_prefix>)


@pytest.mark.parametrize("order", ["spm", "psm"])
def test_transform_cuts_at_its_cursor_and_lays_it_out_as_inference(small_tokenizer, order):
    """The transform's own random cut, replayed from its seed, gives exactly the inference layout."""
    tok = small_tokenizer
    spm_rate = 1.0 if order == "spm" else 0.0
    config = FimConfig(fim_rate=1.0, spm_rate=spm_rate)
    for seed, text in enumerate(TEXTS):
        ids, _ = transform(tok, text, random.Random(seed), config)
        replay = random.Random(seed)
        replay.random()  # the fim_rate draw
        a, b = choose_cut(text, replay, config)
        assert ids == expected_example(tok, order, text[:a], text[a:b], text[b:])


@pytest.mark.parametrize("order", ["spm", "psm"])
def test_synthetic_example_is_the_inference_prompt_then_the_middle(small_tokenizer, order):
    tok = small_tokenizer
    rng = random.Random(1)
    examples = [FimExample(p, m, s, "given") for p, m, s in cursors(20, seed=2)]
    examples += [e for e in (synthesize(rng.choice(TEXTS), rng, SynthConfig()) for _ in range(60)) if e is not None]
    assert {e.kind for e in examples} >= {"given"} | set(DEFAULT_KINDS)
    for e in examples:
        ids, mask = example_tokens(tok, e, order == "spm", prompt_tokens=10**6)  # a budget nothing reaches
        assert ids == expected_example(tok, order, e.prefix, e.middle, e.suffix)
        answer = len(tok.encode(e.middle)) + 1
        assert mask == [False] * (len(ids) - answer) + [True] * answer


@pytest.mark.parametrize("order", ["spm", "psm"])
def test_synthetic_example_under_a_budget_is_the_trimmed_inference_prompt(small_tokenizer, order):
    tok = small_tokenizer
    for prefix, middle, suffix in cursors(20, seed=3):
        ids, _ = example_tokens(tok, FimExample(prefix, middle, suffix, "given"), order == "spm", prompt_tokens=120)
        prompt = fim_prompt(tok, prefix, suffix, order, budget=120)
        assert len(prompt) <= 120 and ids == prompt + tok.encode(middle) + [tok.eot_id]


def test_the_layout_itself(small_tokenizer):
    tok = small_tokenizer
    p, s = tok.encode("x = f("), tok.encode(")\n")
    assert fim_layout(tok, "spm", p, s) == [tok.eot_id, tok.fim_suffix_id, *s, tok.fim_prefix_id, *p, tok.fim_middle_id]
    assert fim_layout(tok, "psm", p, s) == [tok.fim_prefix_id, *p, tok.fim_suffix_id, *s, tok.fim_middle_id]
