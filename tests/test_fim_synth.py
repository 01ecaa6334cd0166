"""The finetune mix: each synthetic kind is what it claims, instruction pairs are well-formed."""

from __future__ import annotations

import ast
import io
import random
import tokenize

import numpy as np
import pytest

from midfill.data.documents import Document
from midfill.data.fim_synth import (
    CUTTERS,
    DEFAULT_KINDS,
    IDENTIFIER,
    MIN_NAME_CHARS,
    SynthConfig,
    cutter,
    example_empty,
    example_line,
    example_line_start,
    example_mid_identifier,
    example_multi,
    example_rest_of_line,
    example_single,
    example_tokens,
)
from midfill.data.finetune_mix import MixConfig, build_finetune_mix
from midfill.data.instructions import instruction_pairs, pair_tokens, source_lines, source_segment
from midfill.data.packing import TokenShards
from midfill.prompts import ChatMessage, chat_prompt, indent_of
from tests.helpers import stdlib_texts

TEXTS = stdlib_texts(30)


def rng_examples(make, n=300, seed=0):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        example = make(rng.choice(TEXTS), rng)
        if example is not None:
            out.append(example)
    return out


@pytest.mark.parametrize("kind", list(CUTTERS))
def test_every_example_reassembles_its_file_and_its_middle_ends_at_a_line_end(kind):
    for e in rng_examples(cutter(kind), 100):
        assert e.prefix + e.middle + e.suffix in TEXTS and e.kind == kind
        assert e.suffix == "" or e.suffix.startswith("\n")  # the newline that ends the middle is the suffix's
        if kind != "multi":
            assert "\n" not in e.middle


def test_empty_examples_sit_at_the_end_of_a_complete_line():
    for e in rng_examples(example_empty):
        assert e.middle == "" and (e.suffix == "" or e.suffix.startswith("\n"))
        assert e.prefix.rsplit("\n", 1)[-1].strip()  # the cursor's line has code on it


def test_line_examples_are_a_whole_line_from_its_indentation():
    for e in rng_examples(example_line):
        assert e.prefix.rsplit("\n", 1)[-1].strip() == "" and e.middle.strip() and not e.middle[0].isspace()


def test_rest_of_line_examples_start_strictly_inside_the_line():
    for e in rng_examples(example_rest_of_line):
        before = e.prefix.rsplit("\n", 1)[-1]
        assert before.strip() and e.middle.strip()  # code on both sides of the cursor


def test_single_examples_are_line_or_rest_of_line():
    whole_lines = sum(e.prefix.rsplit("\n", 1)[-1].strip() == "" for e in rng_examples(example_single))
    assert 0 < whole_lines < 300  # both "one line" and "rest of a line" occur


def test_line_start_examples_are_the_whole_indented_line_after_a_bare_newline():
    for e in rng_examples(example_line_start):
        assert e.prefix.endswith("\n") and indent_of(e.middle) > 0 and e.middle.strip()


def names_around(text: str, cursor: int) -> list[str]:
    """The Python NAME tokens of `text` that the cursor is strictly inside."""
    line, column = text.count("\n", 0, cursor) + 1, cursor - (text.rfind("\n", 0, cursor) + 1)
    return [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type == tokenize.NAME and t.start[0] == line and t.start[1] < column < t.end[1]]  # fmt: skip


def test_mid_identifier_cursor_is_strictly_inside_a_long_name():
    for e in rng_examples(example_mid_identifier, 100):
        text = e.prefix + e.middle + e.suffix
        assert any(len(name) >= MIN_NAME_CHARS for name in names_around(text, len(e.prefix)))
        assert e.middle[0].isidentifier() or e.middle[0].isdigit()  # the rest of the name comes first


def test_mid_identifier_outside_python_falls_back_to_identifier_words():
    untokenizable = 'x = """never closed\nvalue_name = compute(other)\n'  # EOF inside a string: TokenError
    rng = random.Random(0)
    for _ in range(50):
        e = example_mid_identifier(untokenizable, rng)
        cursor = len(e.prefix)
        assert any(m.start() < cursor < m.end() for m in IDENTIFIER.finditer(untokenizable))
    assert example_mid_identifier("a = 1\nb = a + 2\n", rng) is None  # no name of 4 characters


def test_the_default_mix_is_every_editor_cursor():
    assert SynthConfig().kinds == DEFAULT_KINDS
    assert sum(DEFAULT_KINDS.values()) == pytest.approx(1.0)
    assert set(DEFAULT_KINDS) == {"empty", "line", "rest-of-line", "mid-identifier", "line-start", "multi"} <= set(CUTTERS)


def test_multi_examples_end_where_the_block_ends():
    for e in rng_examples(lambda t, r: example_multi(t, r, 12)):
        cursor_indent = len(e.prefix.rsplit("\n", 1)[-1])
        lines = e.middle.split("\n")
        assert 2 <= len(lines) <= 12 and e.prefix.rsplit("\n", 1)[-1].strip() == ""
        assert all(line.strip() and indent_of(line) >= cursor_indent for line in lines[1:])
        following = e.suffix.split("\n")[1] if e.suffix.count("\n") >= 1 else None
        # the next line is blank, dedented below the cursor's line, or the file ends
        assert following is None or not following.strip() or indent_of(following) < cursor_indent


@pytest.mark.parametrize("spm", [True, False])
def test_example_tokens_end_with_eot_and_train_only_the_middle(small_tokenizer, spm):
    tok = small_tokenizer
    e = rng_examples(example_rest_of_line, 1)[0]
    ids, mask = example_tokens(tok, e, spm, prompt_tokens=200)
    middle = ids[ids.index(tok.fim_middle_id) + 1 :]
    assert middle[-1] == tok.eot_id and tok.decode(middle[:-1]) == e.middle
    assert [m for m in mask] == [False] * (len(ids) - len(middle)) + [True] * len(middle)
    assert ids[: 2 if spm else 1] == ([tok.eot_id, tok.fim_suffix_id] if spm else [tok.fim_prefix_id])  # the inference layout


SOURCE = '''
def clamp(value, low, high):
    """Limit a number to the closed range between low and high, inclusive."""
    if value < low:
        return low
    return min(value, high)


def _private(x):
    """Private helpers are not used for instructions at all."""
    return x


def short(x):
    """Too short."""
    return x
'''


def test_instruction_pairs_from_documented_functions(small_tokenizer):
    pairs = list(instruction_pairs(SOURCE))
    assert [p.kind for p in pairs] == ["write", "explain"]
    write, explain = pairs
    assert write.query.startswith("Write a Python function `clamp(value, low, high)`: Limit a number")
    assert write.answer.startswith("```python\ndef clamp(") and write.answer.endswith("```")
    assert "Limit a number" not in explain.query and "return min(value, high)" in explain.query
    assert explain.answer == "Limit a number to the closed range between low and high, inclusive."
    ids, mask = pair_tokens(small_tokenizer, write)
    prompt = chat_prompt(small_tokenizer, [ChatMessage("system", "You are a programming assistant"), ChatMessage("user", write.query)])
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)]) and all(mask[len(prompt) :])
    assert ids[-1] == small_tokenizer.eot_id
    assert list(instruction_pairs("def broken(:\n")) == []


def test_source_segments_equal_ast_ones():
    """Sliced from lines split once (ast re-splits the file per call), the same text, CRLF, tabs and non-ASCII included."""
    texts = TEXTS[:10] + ["class A:\r\n\tdef f(self):\r\n\t\treturn 'é'  # ü\r\n\r\n\tdef g(self): return 1\r\n"]
    checked = 0
    for text in texts:
        lines = source_lines(text)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                assert source_segment(lines, node) == ast.get_source_segment(text, node, padded=True)
                checked += 1
    assert checked > 50


def test_the_mix_has_the_asked_ratio(small_tokenizer, tmp_path):
    tok_path = tmp_path / "tok.json"
    small_tokenizer.save(tok_path)
    docs = [Document(text=t, path=f"m{i}.py", lang="python") for i, t in enumerate(TEXTS)]
    manifest = build_finetune_mix(docs, small_tokenizer, tok_path, tmp_path / "mix", MixConfig(examples=400, seed=1))
    kinds = manifest["examples_per_kind"]
    assert sum(kinds.values()) == 400
    assert kinds["instruct-write"] + kinds["instruct-explain"] == 60  # 15%
    assert set(DEFAULT_KINDS) <= set(kinds)  # every kind of the default mix is in a built mix
    shards = TokenShards(tmp_path / "mix", "train")
    ids, mask = shards.window(0, len(shards)), shards.mask_window(0, len(shards))
    assert mask.any() and not mask.all()
    assert int(((ids == small_tokenizer.eot_id) & mask).sum()) == sum(kinds.values()) - sum(1 for _ in range(400) if _ % 50 == 49)
    assert np.dtype(manifest["dtype"]) == np.uint16
