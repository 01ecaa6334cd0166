"""Synthetic FIM examples cut where editors put the cursor: the card's finetune data and its evaluation.

Kinds, each cut from real code at a random cursor (`CUTTERS`):
- empty: the cursor at the end of a complete line; the right completion is nothing;
- line: the cursor after a line's indentation; the middle is the rest of the line (the whole line);
- rest-of-line: the cursor at a column strictly inside a line's content; the middle is the rest of it;
- mid-identifier: the cursor strictly inside a name of 4 or more characters (a Python NAME token,
  as `tokenize` says; any identifier-shaped word where the text is not Python); the middle is the
  rest of the line;
- line-start: the cursor at column 0 of an indented line, the prefix ending in its bare newline
  (what llama.vim sends on an auto-indented blank line); the middle is the whole line, indentation
  included;
- multi: from a line's indentation to the end of its block: the middle's last line is followed
  by a blank line, a line indented less than the cursor's line, or the end of the file;
- single: line or rest-of-line, a column anywhere from the indentation (the earlier default's
  cut; `--mix single=...` and the repository finetune's report still use it).
The middle never includes the newline that ends it (the suffix starts with it). An example is the
inference prompt itself (`prompts.fim_prompt`, same budget trimming, SPM's leading <|endoftext|>
included), then the middle and <|endoftext|>, so the model learns to stop exactly there. Only the
middle and that <|endoftext|> are loss targets: the prompt is context.

Default mix (`DEFAULT_KINDS`), SPM order half the time: multi 30% (the longest middles, and where
a block ends is the hardest stop to learn), rest-of-line 20% and mid-identifier 15% (a cursor in the
middle of a line, most often in the middle of a word being typed: the prompt then ends inside a
token, which the model only learns to grow back by seeing it), line 15%, and 10% each for the two
cursors whose right first token is unusual: nothing at all (empty) and the line's own indentation
(line-start).
"""

from __future__ import annotations

import functools
import io
import random
import re
import tokenize
from collections.abc import Callable
from dataclasses import dataclass, field

from midfill.prompts import fim_prompt, indent_of
from midfill.tokenizer import Tokenizer

DEFAULT_KINDS = {"empty": 0.1, "line": 0.15, "rest-of-line": 0.2, "mid-identifier": 0.15, "line-start": 0.1, "multi": 0.3}
ATTEMPTS = 20  # cursor positions tried per file before giving up on a kind
MIN_NAME_CHARS = 4
IDENTIFIER = re.compile(r"\b[^\W\d]\w{%d,}" % (MIN_NAME_CHARS - 1))  # a whole word of MIN_NAME_CHARS or more, not a number


@dataclass(frozen=True)
class SynthConfig:
    kinds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KINDS))
    spm_rate: float = 0.5
    prompt_tokens: int = 400  # the prompt's budget, sentinels included (the suffix takes at most a quarter)
    max_middle_lines: int = 12


@dataclass(frozen=True)
class FimExample:
    prefix: str
    middle: str
    suffix: str
    kind: str


def line_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every line's content, end excluding its newline."""
    spans, start = [], 0
    for line in text.split("\n"):
        spans.append((start, start + len(line)))
        start += len(line) + 1
    return spans


def rest_of_line(text: str, cursor: int, kind: str) -> FimExample:
    """The example whose middle runs from `cursor` to the end of its line."""
    end = text.find("\n", cursor)
    end = len(text) if end < 0 else end
    return FimExample(text[:cursor], text[cursor:end], text[end:], kind)


def example_empty(text: str, rng: random.Random) -> FimExample | None:
    spans = line_spans(text)
    for _ in range(ATTEMPTS):
        start, end = rng.choice(spans)
        if text[start:end].strip():
            return FimExample(text[:end], "", text[end:], "empty")
    return None


def example_at_column(text: str, rng: random.Random, kind: str, columns: Callable[[str], range]) -> FimExample | None:
    """The rest of a random line from a random one of the cursor columns `columns(line)` allows."""
    spans = line_spans(text)
    for _ in range(ATTEMPTS):
        start, end = rng.choice(spans)
        allowed = columns(text[start:end])
        if allowed:
            return rest_of_line(text, start + rng.choice(allowed), kind)
    return None


def example_line(text: str, rng: random.Random) -> FimExample | None:
    return example_at_column(text, rng, "line", lambda line: range(indent_of(line), indent_of(line) + bool(line.strip())))


def example_rest_of_line(text: str, rng: random.Random) -> FimExample | None:
    return example_at_column(text, rng, "rest-of-line", lambda line: range(indent_of(line) + 1, len(line.rstrip())))


def example_single(text: str, rng: random.Random) -> FimExample | None:
    return example_at_column(text, rng, "single", lambda line: range(indent_of(line), len(line.rstrip())))


@functools.lru_cache(maxsize=256)  # the mix cuts many examples from each large file
def long_names(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of the names of at least MIN_NAME_CHARS characters in `text`: Python's
    NAME tokens, or where `text` does not tokenize as Python, every identifier-shaped word."""
    starts = [start for start, _ in line_spans(text)]
    try:
        return [(starts[t.start[0] - 1] + t.start[1], starts[t.start[0] - 1] + t.end[1])
                for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type == tokenize.NAME and len(t.string) >= MIN_NAME_CHARS]  # fmt: skip
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        return [m.span() for m in IDENTIFIER.finditer(text)]


def example_mid_identifier(text: str, rng: random.Random) -> FimExample | None:
    names = long_names(text)
    if not names:
        return None
    start, end = rng.choice(names)
    return rest_of_line(text, rng.randint(start + 1, end - 1), "mid-identifier")


def example_line_start(text: str, rng: random.Random) -> FimExample | None:
    indented = [start for start, end in line_spans(text) if start > 0 and text[start:end].strip()
                and indent_of(text[start:end]) > 0]  # fmt: skip
    return rest_of_line(text, rng.choice(indented), "line-start") if indented else None


def block_end(lines: list[str], first: int, indent: int, max_lines: int) -> int | None:
    """Index of the last line of the block that starts at `first`, if it has 2..max_lines lines."""
    last = first
    while last + 1 < len(lines):
        following = lines[last + 1]
        if not following.strip() or indent_of(following) < indent:
            break
        last += 1
    return last if 1 <= last - first < max_lines else None


def example_multi(text: str, rng: random.Random, max_lines: int = 12) -> FimExample | None:
    lines, spans = text.split("\n"), line_spans(text)
    for _ in range(ATTEMPTS):
        first = rng.randrange(len(lines))
        if not lines[first].strip():
            continue
        indent = indent_of(lines[first])
        last = block_end(lines, first, indent, max_lines)
        if last is None:
            continue
        cursor, end = spans[first][0] + indent, spans[last][1]
        return FimExample(text[:cursor], text[cursor:end], text[end:], "multi")
    return None


CUTTERS: dict[str, Callable[..., FimExample | None]] = {
    "empty": example_empty,
    "line": example_line,
    "rest-of-line": example_rest_of_line,
    "mid-identifier": example_mid_identifier,
    "line-start": example_line_start,
    "multi": example_multi,
    "single": example_single,
}


def cutter(kind: str, max_middle_lines: int = 12) -> Callable[[str, random.Random], FimExample | None]:
    """The function that cuts an example of `kind` from a text (None where the text offers none)."""
    if kind not in CUTTERS:
        raise ValueError(f"unknown synthetic FIM kind {kind!r}; use one of {', '.join(CUTTERS)}")
    return functools.partial(example_multi, max_lines=max_middle_lines) if kind == "multi" else CUTTERS[kind]


def synthesize(text: str, rng: random.Random, config: SynthConfig) -> FimExample | None:
    kind = rng.choices(list(config.kinds), weights=list(config.kinds.values()))[0]
    return cutter(kind, config.max_middle_lines)(text, rng)


def example_tokens(tok: Tokenizer, example: FimExample, spm: bool, prompt_tokens: int) -> tuple[list[int], list[bool]]:
    """The example as the model sees it at inference, then the middle and <|endoftext|>; targets masked."""
    prompt = fim_prompt(tok, example.prefix, example.suffix, "spm" if spm else "psm", prompt_tokens)
    answer = tok.encode(example.middle) + [tok.eot_id]
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)
