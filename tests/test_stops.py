"""Stop rules and the text assembler: where completions end, and what is streamed before they do."""

import pytest

from midfill.engine.assembler import TextAssembler
from midfill.engine.stops import StopRules
from midfill.errors import MidfillError
from midfill.prompts import cursor_indent


def run(tok, text: str, rules: StopRules, finish: str = "stop") -> tuple[str, list[str], TextAssembler]:
    """Feed `text` token by token; return the final text, the deltas and the assembler."""
    assembler = TextAssembler(tok, rules)
    deltas = []
    for token in tok.encode(text):
        deltas.append(assembler.push(token))
        if assembler.done:
            break
    if not assembler.done:
        deltas.append(assembler.finish(finish))
    return assembler.text, [d for d in deltas if d], assembler


def test_cursor_indent():
    assert cursor_indent("def f():\n    ") == 4
    assert cursor_indent("def f():\n    x = g(") == 4
    assert cursor_indent("x") == 0
    assert cursor_indent("class A:\n\tdef f(self):\n\t\t") == 2


def test_single_line_stops_at_newline(refact_tokenizer):
    text, deltas, asm = run(refact_tokenizer, "return a + b\n    print(x)\n", StopRules.for_mode("single-line"))
    assert text == "return a + b"
    assert "".join(deltas) == text and asm.finish_reason == "stop"


def test_single_line_empty_completion(refact_tokenizer):
    text, deltas, _ = run(refact_tokenizer, "\n    other()\n", StopRules.for_mode("single-line"))
    assert text == "" and deltas == []


def test_multi_line_stops_at_smaller_indent(refact_tokenizer):
    generated = "total = 0\n    for x in xs:\n        total += x\n    return total\ndef next_function():\n"
    text, deltas, _ = run(refact_tokenizer, generated, StopRules.for_mode("multi-line", cursor_indent=4))
    assert text == "total = 0\n    for x in xs:\n        total += x\n    return total"
    assert "".join(deltas) == text


def test_multi_line_stops_at_blank_line(refact_tokenizer):
    text, _, _ = run(refact_tokenizer, "a = 1\nb = 2\n\nc = 3\n", StopRules.for_mode("multi-line"))
    assert text == "a = 1\nb = 2"
    text, _, _ = run(refact_tokenizer, "a = 1\n    \nc = 3\n", StopRules.for_mode("multi-line"))
    assert text == "a = 1"


def test_multi_line_trims_trailing_whitespace_at_eot(refact_tokenizer):
    text, deltas, asm = run(refact_tokenizer, "x = 1\n    y = 2\n   ", StopRules.for_mode("multi-line"), finish="stop")
    assert text == "x = 1\n    y = 2" and "".join(deltas) == text


def test_stop_string_never_streamed_in_part(refact_tokenizer):
    rules = StopRules(stop_strings=("\ndef",))
    text, deltas, _ = run(refact_tokenizer, "x = 1\n    return x\ndef g():\n", rules)
    assert text == "x = 1\n    return x"
    assert "".join(deltas) == text
    assert all("\nd" not in d for d in deltas)


def test_earliest_stop_wins(refact_tokenizer):
    rules = StopRules.for_mode("multi-line", stop_strings=("END", "STOP"))
    text, _, _ = run(refact_tokenizer, "a STOP b END\n\n", rules)
    assert text == "a"


def test_streamed_utf8_is_never_broken(refact_tokenizer):
    sample = "naïve café — 日本語 🙂 done"
    assembler = TextAssembler(refact_tokenizer)
    ids = refact_tokenizer.encode(sample)
    deltas = [assembler.push(t) for t in ids] + [assembler.finish("length")]
    assert len(ids) > len(sample.split())  # multi-byte characters really are spread over tokens
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == sample == assembler.text
    assert assembler.finish_reason == "length"


def test_free_mode_keeps_whitespace(refact_tokenizer):
    text, _, _ = run(refact_tokenizer, "line\n\n  ", StopRules(), finish="length")
    assert text == "line\n\n  "


def test_empty_stop_string_rejected():
    with pytest.raises(MidfillError):
        StopRules(stop_strings=("",))
    with pytest.raises(MidfillError, match="unknown completion mode"):
        StopRules.for_mode("two-lines")


def test_min_indent_alone_does_not_stop_at_blank_lines(refact_tokenizer):
    rules = StopRules(min_indent=4)  # llama.cpp's n_indent
    text, _, _ = run(refact_tokenizer, "a = 1\n\n    b = 2\nc = 3\n", rules)
    assert text == "a = 1\n\n    b = 2"


@pytest.mark.parametrize("text, suffix, cut", [
    ("foo(a, b))", ")\n    return x\n", "foo(a, b)"),  # a closing bracket the suffix already has
    ('name = "x"', '"\n', 'name = "x'),
    ("x = 1\n    return x", "    return x\n", "x = 1\n"),  # the next line, written again
    ("total)", "):\n", "total"),  # closers and punctuation
    ("a = b", "b + c\n", "a = b"),  # near miss: a shared letter is not a repeat
    ("print(x", "x)\n", "print(x"),  # near miss: the suffix's start is a word fragment
    ("retur", "return x\n", "retur"),
    ("x = 1  ", "  \n", "x = 1  "),  # whitespace alone is never cut
    ("", ")\n", ""),
])
def test_an_answer_that_repeats_the_suffix_start_is_cut(text, suffix, cut):
    from midfill.engine.stops import suffix_window

    rules = StopRules(suffix_start=suffix_window(suffix))
    assert rules.finalize(text) == cut
    assert rules.safe_length(text) <= len(cut)  # streaming never sends what may be cut


def test_overlap_cutting_streams_the_same_text(small_tokenizer):
    from midfill.engine.assembler import TextAssembler

    rules = StopRules(suffix_start=")\n    return x")
    assembler = TextAssembler(small_tokenizer, rules)
    streamed = "".join(assembler.push(i) for i in small_tokenizer.encode("foo(a, b))")) + assembler.finish("eos")
    assert streamed == assembler.text == "foo(a, b)"
