"""Synthetic FIM examples that teach a model where a completion ends (the card's finetune data).

Three kinds, cut from real code at a random cursor:
- empty: the cursor at the end of a complete line; the right completion is nothing;
- single: the rest of a line from a column inside it (from its indentation: the whole line);
- multi: from a line's indentation to the end of its block: the middle's last line is followed
  by a blank line, a line indented less than the cursor's line, or the end of the file.
The middle never includes the newline that ends it (the suffix starts with it). An example is the
inference prompt itself (`prompts.fim_prompt`, same budget trimming, SPM's leading <|endoftext|>
included), then the middle and <|endoftext|>, so the model learns to stop exactly there. Only the
middle and that <|endoftext|> are loss targets: the prompt is context.

Default mix: empty 10%, single 45%, multi 45% (`SynthConfig.kinds`), SPM order half the time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from midfill.prompts import fim_prompt, indent_of
from midfill.tokenizer import Tokenizer

DEFAULT_KINDS = {"empty": 0.1, "single": 0.45, "multi": 0.45}
ATTEMPTS = 20  # cursor positions tried per file before giving up on a kind


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


def example_empty(text: str, rng: random.Random) -> FimExample | None:
    spans = line_spans(text)
    for _ in range(ATTEMPTS):
        start, end = rng.choice(spans)
        if text[start:end].strip():
            return FimExample(text[:end], "", text[end:], "empty")
    return None


def example_single(text: str, rng: random.Random) -> FimExample | None:
    spans = line_spans(text)
    for _ in range(ATTEMPTS):
        start, end = rng.choice(spans)
        line = text[start:end]
        if not line.strip() or len(line.rstrip()) <= indent_of(line):
            continue
        column = rng.randint(indent_of(line), len(line.rstrip()) - 1)
        return FimExample(text[: start + column], line[column:], text[end:], "single")
    return None


def block_end(lines: list[str], first: int, indent: int, max_lines: int) -> int | None:
    """Index of the last line of the block that starts at `first`, if it has 2..max_lines lines."""
    last = first
    while last + 1 < len(lines):
        following = lines[last + 1]
        if not following.strip() or indent_of(following) < indent:
            break
        last += 1
    return last if 1 <= last - first < max_lines else None


def example_multi(text: str, rng: random.Random, max_lines: int) -> FimExample | None:
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


def synthesize(text: str, rng: random.Random, config: SynthConfig) -> FimExample | None:
    kind = rng.choices(list(config.kinds), weights=list(config.kinds.values()))[0]
    if kind == "empty":
        return example_empty(text, rng)
    if kind == "single":
        return example_single(text, rng)
    if kind == "multi":
        return example_multi(text, rng, config.max_middle_lines)
    raise ValueError(f"unknown synthetic FIM kind {kind!r}")


def example_tokens(tok: Tokenizer, example: FimExample, spm: bool, prompt_tokens: int) -> tuple[list[int], list[bool]]:
    """The example as the model sees it at inference, then the middle and <|endoftext|>; targets masked."""
    prompt = fim_prompt(tok, example.prefix, example.suffix, "spm" if spm else "psm", prompt_tokens)
    answer = tok.encode(example.middle) + [tok.eot_id]
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)
