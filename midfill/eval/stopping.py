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
from midfill.engine import StopRules, TextAssembler, stream_text
from midfill.model import GPTRefactForCausalLM
from midfill.prompts import fim_prompt_spm
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


def sample_examples(texts: list[str], make, count: int, rng: random.Random) -> list[FimExample]:
    """Up to `count` examples cut by make(text, rng) from texts drawn at random (fewer only if the
    texts offer almost none: the tries are bounded, so text without a usable line cannot hang it)."""
    out: list[FimExample] = []
    for _ in range(50 * count if texts else 0):
        if len(out) >= count:
            break
        example = make(rng.choice(texts), rng)
        if example is not None:
            out.append(example)
    return out


def held_out_examples(texts: list[str], per_kind: int, seed: int = 0, max_middle_lines: int = 12) -> dict[str, list[FimExample]]:
    rng = random.Random(seed)
    makers = {"single": example_single, "multi": lambda t, r: example_multi(t, r, max_middle_lines), "empty": example_empty}
    return {kind: sample_examples(texts, make, per_kind, rng) for kind, make in makers.items()}


def complete(model: GPTRefactForCausalLM, tok: Tokenizer, example: FimExample, rules: StopRules, budget: int, max_new: int) -> str:
    prompt = fim_prompt_spm(tok, example.prefix, example.suffix, budget=budget)
    assembler = TextAssembler(tok, rules)
    return "".join(stream_text(model, prompt, assembler, max_new, stop_ids={tok.eot_id}))


def evaluate_stopping(model: GPTRefactForCausalLM, tok: Tokenizer, examples: dict[str, list[FimExample]],
                      max_new_tokens: int = 96) -> StoppingReport:
    budget = model.config.n_positions - max_new_tokens
    free = StopRules()
    single = [complete(model, tok, e, StopRules.for_mode("single-line"), budget, max_new_tokens) == e.middle.rstrip()
              for e in examples["single"]]
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
    return StoppingReport(mean(single), mean(stopped_right), mean(empty_right), mean(over),
                          {kind: len(v) for kind, v in examples.items()})
