"""FIM and chat prompts: the exact token layout, and trimming to a budget at line boundaries."""

import pytest

from midfill.errors import MidfillError
from midfill.prompts import ChatMessage, chat_prompt, fim_prompt, fim_prompt_psm, fim_prompt_spm

PREFIX = "def f(x):\n    \"\"\""
SUFFIX = "\n    return x"


def example_ids(examples, text: str) -> list[int]:
    return next(e["ids"] for e in examples if e["text"] == text)


def test_spm_prompt_equals_reference_encoding(refact_tokenizer, tokenizer_examples):
    ids = fim_prompt_spm(refact_tokenizer, PREFIX, SUFFIX)
    expected = example_ids(tokenizer_examples, f"<fim_suffix>{SUFFIX}<fim_prefix>{PREFIX}<fim_middle>")
    assert ids == [refact_tokenizer.eot_id, *expected]  # Refact's client puts <|endoftext|> first


def test_psm_prompt_equals_reference_encoding(refact_tokenizer, tokenizer_examples):
    prefix, suffix = 'def print_hello_world():\n    """', '\n    print("Hello world!")'
    expected = example_ids(tokenizer_examples, f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>")
    assert fim_prompt_psm(refact_tokenizer, prefix, suffix) == expected
    assert fim_prompt(refact_tokenizer, prefix, suffix, order="psm") == expected


def test_chat_prompt_equals_reference_encoding(refact_tokenizer, tokenizer_examples):
    text = next(e["text"] for e in tokenizer_examples if e["text"].startswith("<empty_output>SYSTEM"))
    messages = [ChatMessage("system", "You are a programming assistant"), ChatMessage("user", "How do I sort a list in Python?")]
    assert chat_prompt(refact_tokenizer, messages) == example_ids(tokenizer_examples, text)


def test_multi_turn_chat_layout(refact_tokenizer):
    tok = refact_tokenizer
    messages = [ChatMessage("system", "S"), ChatMessage("user", "q1"), ChatMessage("assistant", "a1"), ChatMessage("user", "q2")]
    text = "<empty_output>SYSTEM S\n<empty_output>USER q1\n<empty_output>ASSISTANT a1\n<empty_output>USER q2\n<empty_output>ASSISTANT"
    assert chat_prompt(tok, messages) == tok.encode_with_special(text)


def test_chat_errors(refact_tokenizer):
    with pytest.raises(MidfillError, match="end with a user message"):
        chat_prompt(refact_tokenizer, [ChatMessage("system", "s")])
    with pytest.raises(MidfillError, match="unknown chat role"):
        chat_prompt(refact_tokenizer, [ChatMessage("robot", "s"), ChatMessage("user", "q")])
    with pytest.raises(MidfillError, match="over the budget"):
        chat_prompt(refact_tokenizer, [ChatMessage("user", "word " * 100)], budget=20)


def test_chat_drops_oldest_turns_first_and_keeps_system(refact_tokenizer):
    tok = refact_tokenizer
    history = [ChatMessage("system", "be brief")]
    for i in range(20):
        history += [ChatMessage("user", f"question number {i} " * 3), ChatMessage("assistant", f"answer {i} " * 3)]
    history.append(ChatMessage("user", "last question"))
    ids = chat_prompt(tok, history, budget=120)
    text = tok.decode(ids, skip_special=False)
    assert len(ids) <= 120
    assert text.startswith("<empty_output>SYSTEM be brief\n")
    assert text.endswith("<empty_output>USER last question\n<empty_output>ASSISTANT")
    assert "question number 0 " not in text and "answer 19" in text


def test_sentinel_strings_in_code_stay_text(refact_tokenizer):
    ids = fim_prompt_spm(refact_tokenizer, 'tag = "<fim_middle>"\n', "")
    assert ids.count(refact_tokenizer.fim_middle_id) == 1 and ids[-1] == refact_tokenizer.fim_middle_id


def numbered_lines(n: int, width: int = 3) -> str:
    return "".join(f"line_{i} = {i}  # " + "pad " * width + "\n" for i in range(n))


@pytest.mark.parametrize("order", ["spm", "psm"])
def test_over_budget_prompt_trimmed_at_line_boundaries(refact_tokenizer, order):
    tok = refact_tokenizer
    prefix = numbered_lines(200) + "    result = comp"
    suffix = "ute()\n" + numbered_lines(200)
    budget = 300
    ids = fim_prompt(tok, prefix, suffix, order=order, budget=budget)
    assert len(ids) <= budget
    assert len(ids) >= budget - 40  # little room wasted
    sentinels = {tok.eot_id, tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id}
    if order == "spm":
        cut = ids.index(tok.fim_prefix_id)
        suffix_ids, prefix_ids = ids[2:cut], ids[cut + 1 : -1]
    else:
        cut = ids.index(tok.fim_suffix_id)
        prefix_ids, suffix_ids = ids[1:cut], ids[cut + 1 : -1]
    kept_prefix, kept_suffix = tok.decode(prefix_ids), tok.decode(suffix_ids)
    assert not sentinels & set(prefix_ids + suffix_ids)
    assert prefix.endswith(kept_prefix) and kept_prefix.startswith("line_")  # whole lines from the left
    assert suffix.startswith(kept_suffix) and kept_suffix.endswith("\n")  # whole lines from the right
    assert len(suffix_ids) <= (budget - 4) * 0.25 + 1  # the documented split: suffix gets at most 25%


def test_short_prefix_leaves_room_to_suffix(refact_tokenizer):
    tok = refact_tokenizer
    ids = fim_prompt_spm(tok, "x = ", numbered_lines(100), budget=200)
    assert 190 <= len(ids) <= 200  # the suffix uses what the short prefix leaves


def test_over_long_cursor_line_cut_inside(refact_tokenizer):
    tok = refact_tokenizer
    prefix = "a = [" + ", ".join(str(i) for i in range(500))
    ids = fim_prompt_spm(tok, prefix, "]\n", budget=64)
    assert len(ids) == 64
    assert prefix.endswith(tok.decode(ids[ids.index(tok.fim_prefix_id) + 1 : -1]))


def test_prompt_within_budget_untouched(refact_tokenizer):
    tok = refact_tokenizer
    assert fim_prompt_spm(tok, PREFIX, SUFFIX, budget=4096) == fim_prompt_spm(tok, PREFIX, SUFFIX)
    with pytest.raises(MidfillError, match="too small"):
        fim_prompt_spm(tok, PREFIX, SUFFIX, budget=3)
    with pytest.raises(MidfillError, match="unknown FIM order"):
        fim_prompt(tok, PREFIX, SUFFIX, order="pms")


def test_cursor_indent_is_that_of_the_cursors_line():
    from midfill.prompts import cursor_indent, indent_of

    assert indent_of("\t  x = 1") == 3 and indent_of("x") == 0
    assert cursor_indent("def f():\n    ") == 4 and cursor_indent("def f():\n    x = g(") == 4
    assert cursor_indent("x") == 0 and cursor_indent("class A:\n\tdef f(self):\n\t\t") == 2
