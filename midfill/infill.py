"""Held-out infill examples and the model's completions of them, through the engine: what the
stopping metrics of `midfill eval` and the finetune's report both measure."""

from __future__ import annotations

import random

from midfill.data.fim_synth import FimExample
from midfill.engine import StopRules, TextAssembler, stream_text
from midfill.model import GPTRefactForCausalLM
from midfill.prompts import fim_prompt_spm
from midfill.tokenizer import Tokenizer


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


def complete(model: GPTRefactForCausalLM, tok: Tokenizer, example: FimExample, rules: StopRules, budget: int, max_new: int) -> str:
    prompt = fim_prompt_spm(tok, example.prefix, example.suffix, budget=budget)
    assembler = TextAssembler(tok, rules)
    return "".join(stream_text(model, prompt, assembler, max_new, stop_ids={tok.eot_id}))


def exact_match(model: GPTRefactForCausalLM, tok: Tokenizer, examples: list[FimExample], budget: int, max_new: int) -> float:
    """Share of examples completed exactly to the end of their line (greedy, single-line stop rule, as an editor asks)."""
    rules = StopRules.for_mode("single-line")
    return sum(complete(model, tok, e, rules, budget, max_new) == e.middle.rstrip() for e in examples) / max(len(examples), 1)
