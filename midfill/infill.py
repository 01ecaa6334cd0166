"""Held-out infill examples and the model's completions of them, through the engine: what the
stopping metrics of `midfill eval` and the finetune's report both measure."""

from __future__ import annotations

import random
from collections.abc import Callable

from midfill.data.fim_synth import FimExample
from midfill.engine import StopRules
from midfill.engine.request import Finished, GenerationRequest, GenerationResult
from midfill.engine.scheduler import Engine
from midfill.model import GPTRefactForCausalLM
from midfill.prompts import fim_prompt_healed
from midfill.tokenizer import Tokenizer

BATCH = 8  # rows decoded together: each row's greedy answer is the one it gets alone


def sample_examples(texts: list[str], make: Callable[[str, random.Random], FimExample | None], count: int,
                    rng: random.Random) -> list[FimExample]:  # fmt: skip
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


def complete_all(model: GPTRefactForCausalLM, tok: Tokenizer, examples: list[FimExample], rules: StopRules, budget: int,
                 max_new: int, heal: bool = False, batch: int = BATCH) -> list[GenerationResult]:  # fmt: skip
    """Greedy completions of the examples' SPM prompts (at most `budget` tokens), `batch` of them
    decoding at once in one engine; with `heal`, each request carries its token-healed prompt, which
    the engine uses where the model's first token says the prefix ends inside a token. No prompt
    cache: every prompt is prefilled alone, so each answer is the one it gets alone."""
    engine = Engine(model, tok, max_batch=batch, max_queue=len(examples), ctx=budget + max_new, prefix_cache_mb=0)
    results: list[GenerationResult | None] = [None] * len(examples)
    for i, e in enumerate(examples):
        ids, healed = fim_prompt_healed(tok, e.prefix, e.suffix, "spm", budget, heal)
        request = GenerationRequest(ids, max_new, rules=rules, stop_ids=frozenset({tok.eot_id}), cache_prompt=False,
                                    healed_prompt_ids=healed)  # fmt: skip
        engine.submit(request, lambda event, i=i: results.__setitem__(i, event.result) if isinstance(event, Finished) else None)
    engine.drive()
    failed = [i for i, r in enumerate(results) if r is None or r.finish_reason == "error"]
    if failed:  # a bug, logged by the engine: a failed row must not pass for a wrong answer
        raise RuntimeError(f"{len(failed)} of {len(examples)} completions failed, the first example {failed[0]}")
    return results  # type: ignore[return-value]


def complete(model: GPTRefactForCausalLM, tok: Tokenizer, example: FimExample, rules: StopRules, budget: int, max_new: int,
             heal: bool = False) -> str:  # fmt: skip
    return complete_all(model, tok, [example], rules, budget, max_new, heal, batch=1)[0].text


def exact_match(model: GPTRefactForCausalLM, tok: Tokenizer, examples: list[FimExample], budget: int, max_new: int,
                heal: bool = False) -> float:  # fmt: skip
    """Share of examples completed exactly to the end of their line (greedy, single-line stop rule, as
    an editor asks); unstripped, so a line's indentation must be right too."""
    results = complete_all(model, tok, examples, StopRules.for_mode("single-line"), budget, max_new, heal)
    return sum(r.text == e.middle.rstrip() for r, e in zip(results, examples)) / max(len(examples), 1)
