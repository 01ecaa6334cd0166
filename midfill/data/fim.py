"""Fill-in-the-middle transformation at training time.

A document is cut into prefix, middle and suffix, then laid out exactly as the model is asked at
inference (`prompts.fim_layout`), followed by the middle and <|endoftext|>:
- PSM: <fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>{middle}<|endoftext|>
- SPM: <|endoftext|><fim_suffix>{suffix}<fim_prefix>{prefix}<fim_middle>{middle}<|endoftext|>
The end-of-text after the middle teaches the model to stop. The prompt's markers (the sentinels
and SPM's leading <|endoftext|>) are inputs, never targets: the loss mask is False there.

Cuts: character-level random spans (two uniform cut points, as in "Efficient Training of Language
Models to Fill in the Middle"), and line-aware ones: one whole line, the rest of a line from a
random column, or several whole lines.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from midfill.prompts import fim_layout
from midfill.tokenizer import Tokenizer

DEFAULT_SPLITTERS = {"char": 0.5, "line": 0.2, "rest_of_line": 0.15, "lines": 0.15}


@dataclass(frozen=True)
class FimConfig:
    fim_rate: float = 0.5  # share of documents transformed
    spm_rate: float = 0.5  # share of transformed documents in SPM order (the rest PSM)
    splitters: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITTERS))
    max_middle_lines: int = 8  # for the "lines" splitter


def split_char(text: str, rng: random.Random) -> tuple[int, int]:
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    return a, b


def line_starts(text: str) -> list[int]:
    starts = [0]
    starts += [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 < len(text)]
    return starts


def line_end(text: str, start: int) -> int:
    """Index just past the line's newline (or the text's end)."""
    newline = text.find("\n", start)
    return len(text) if newline < 0 else newline + 1


def split_line(text: str, rng: random.Random) -> tuple[int, int]:
    start = rng.choice(line_starts(text))
    return start, line_end(text, start)


def split_rest_of_line(text: str, rng: random.Random) -> tuple[int, int]:
    start = rng.choice(line_starts(text))
    end = line_end(text, start)
    content_end = end - 1 if text[end - 1 : end] == "\n" else end
    return rng.randint(start, content_end), end


def split_lines(text: str, rng: random.Random, max_lines: int) -> tuple[int, int]:
    starts = line_starts(text)
    first = rng.randrange(len(starts))
    last = min(len(starts) - 1, first + rng.randint(1, max_lines) - 1)
    return starts[first], line_end(text, starts[last])


def choose_cut(text: str, rng: random.Random, config: FimConfig) -> tuple[int, int]:
    names = list(config.splitters)
    name = rng.choices(names, weights=[config.splitters[n] for n in names])[0]
    if name == "char":
        return split_char(text, rng)
    if name == "line":
        return split_line(text, rng)
    if name == "rest_of_line":
        return split_rest_of_line(text, rng)
    if name == "lines":
        return split_lines(text, rng, config.max_middle_lines)
    raise ValueError(f"unknown FIM splitter {name!r}")


def fim_example(tok: Tokenizer, prefix: str, middle: str, suffix: str, spm: bool) -> tuple[list[int], list[bool]]:
    """Token ids of one FIM example and, per token, whether it may be a training target."""
    prompt = fim_layout(tok, "spm" if spm else "psm", tok.encode(prefix), tok.encode(suffix))
    answer = tok.encode(middle) + [tok.eot_id]
    # plain-text ids are never special, so the prompt's special ids are exactly its markers
    markers = {tok.eot_id, tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id}
    return prompt + answer, [t not in markers for t in prompt] + [True] * len(answer)


def transform(tok: Tokenizer, text: str, rng: random.Random, config: FimConfig) -> tuple[list[int], list[bool]]:
    """One document, FIM-transformed with probability fim_rate, always ending with <|endoftext|>."""
    if not text or rng.random() >= config.fim_rate:
        ids = tok.encode(text) + [tok.eot_id]
        return ids, [True] * len(ids)
    a, b = choose_cut(text, rng, config)
    return fim_example(tok, text[:a], text[a:b], text[b:], spm=rng.random() < config.spm_rate)
