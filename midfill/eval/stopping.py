"""Does the model stop where the code says it should? Infill metrics on held-out files.

Examples come from the synthetic FIM cutter (fim_synth), on files the model never trained on:
- single-line exact match: single-line examples, completed with the single-line stop rule (as an
  editor would), equal to the true rest of the line;
- multi-line "stopped at the right line": multi-line examples, completed with only the model's own
  <|endoftext|> to stop it, ending on the same line as the true middle;
- empty-middle accuracy: the model's first token is <|endoftext|> where nothing is missing;
- over-generation: mean characters generated past the true middle's length (model-stopped runs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from midfill.data.fim_synth import FimExample, example_empty, example_multi, example_single
from midfill.engine import StopRules
from midfill.infill import complete, exact_match, sample_examples
from midfill.model import GPTRefactForCausalLM
from midfill.tokenizer import Tokenizer


@dataclass
class StoppingReport:
    single_line_exact_match: float
    multi_line_stopped_right: float
    empty_middle_accuracy: float
    over_generation_chars: float
    examples: dict[str, int]


def mean(values: list) -> float:
    return sum(values) / max(len(values), 1)


def held_out_examples(texts: list[str], per_kind: int, seed: int = 0, max_middle_lines: int = 12) -> dict[str, list[FimExample]]:
    rng = random.Random(seed)
    makers = {"single": example_single, "multi": lambda t, r: example_multi(t, r, max_middle_lines), "empty": example_empty}
    return {kind: sample_examples(texts, make, per_kind, rng) for kind, make in makers.items()}


def evaluate_stopping(model: GPTRefactForCausalLM, tok: Tokenizer, examples: dict[str, list[FimExample]],
                      max_new_tokens: int = 96) -> StoppingReport:
    budget = model.config.n_positions - max_new_tokens
    free = StopRules()
    single = exact_match(model, tok, examples["single"], budget, max_new_tokens)
    over, stopped_right, empty_right = [], [], []
    for e in examples["multi"]:
        text = complete(model, tok, e, free, budget, max_new_tokens)
        stopped_right.append(text.rstrip().count("\n") == e.middle.count("\n"))
        over.append(max(0, len(text) - len(e.middle)))
    for e in examples["empty"]:
        text = complete(model, tok, e, free, budget, max_new_tokens)
        empty_right.append(text == "")
        over.append(len(text))
    for e in examples["single"]:
        text = complete(model, tok, e, free, budget, max_new_tokens)
        over.append(max(0, len(text) - len(e.middle)))
    return StoppingReport(single, mean(stopped_right), mean(empty_right), mean(over),
                          {kind: len(v) for kind, v in examples.items()})
