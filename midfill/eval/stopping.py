"""Does the model complete and stop where an editor's cursor says it should? Infill metrics on held-out files.

Examples come from the synthetic FIM cutter (fim_synth), on files the model never trained on,
`per_kind` of each kind. Exact match is completed with the single-line stop rule, as an editor
asks, and compared unstripped with the true rest of the line:
- single-line: the whole line, from its indentation (kind "line");
- rest-of-line: from a column inside the line;
- mid-identifier: from inside a name, with token healing off and on (the server heals by default);
- line-start: from column 0 of an indented line, so the indentation must be right (healing off and on).
The rest let only the model's own <|endoftext|> end a completion:
- multi-line "stopped at the right line": the answer ends on the same line as the true middle;
- empty-middle accuracy: the answer is empty where nothing is missing;
- over-generation: mean characters generated past the true middle (multi, empty and line examples).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from midfill.data.fim_synth import FimExample, cutter
from midfill.engine import StopRules
from midfill.infill import complete_all, exact_match, sample_examples
from midfill.model import GPTRefactForCausalLM
from midfill.tokenizer import Tokenizer

KINDS = ("line", "rest-of-line", "mid-identifier", "line-start", "multi", "empty")


@dataclass
class StoppingReport:
    line_exact_match: float
    rest_of_line_exact_match: float
    mid_identifier_exact_match: float
    mid_identifier_exact_match_healed: float
    line_start_exact_match: float
    line_start_exact_match_healed: float
    multi_line_stopped_right: float
    empty_middle_accuracy: float
    over_generation_chars: float
    examples: dict[str, int] = field(default_factory=dict)


def mean(values: list) -> float:
    return sum(values) / max(len(values), 1)


def held_out_examples(
    texts: list[str], per_kind: int = 100, seed: int = 0, max_middle_lines: int = 12
) -> dict[str, list[FimExample]]:
    """`per_kind` examples of every kind; each kind is seeded on its own, so the examples of one do
    not change when another kind's cutter does."""
    return {kind: sample_examples(texts, cutter(kind, max_middle_lines), per_kind, random.Random(f"{seed}-{kind}"))
            for kind in KINDS}  # fmt: skip


def evaluate_stopping(model: GPTRefactForCausalLM, tok: Tokenizer, examples: dict[str, list[FimExample]],
                      max_new_tokens: int = 96) -> StoppingReport:  # fmt: skip
    """Every metric on `examples` (held_out_examples' kinds), greedy, at most `max_new_tokens` each."""
    budget, free = model.config.n_positions - max_new_tokens, StopRules()

    def matches(kind: str, heal: bool = False) -> float:
        return exact_match(model, tok, examples[kind], budget, max_new_tokens, heal)

    def model_stopped(kind: str) -> list[tuple[str, FimExample]]:
        return [
            (r.text, e) for r, e in zip(complete_all(model, tok, examples[kind], free, budget, max_new_tokens), examples[kind])
        ]

    multi, empty, line = model_stopped("multi"), model_stopped("empty"), model_stopped("line")
    return StoppingReport(
        line_exact_match=matches("line"),
        rest_of_line_exact_match=matches("rest-of-line"),
        mid_identifier_exact_match=matches("mid-identifier"),
        mid_identifier_exact_match_healed=matches("mid-identifier", heal=True),
        line_start_exact_match=matches("line-start"),
        line_start_exact_match_healed=matches("line-start", heal=True),
        multi_line_stopped_right=mean([text.rstrip().count("\n") == e.middle.count("\n") for text, e in multi]),
        empty_middle_accuracy=mean([text == "" for text, _ in empty]),
        over_generation_chars=mean([max(0, len(text) - len(e.middle)) for text, e in multi + empty + line]),
        examples={kind: len(v) for kind, v in examples.items()},
    )
