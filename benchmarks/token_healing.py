"""Token healing (issue 16): exact match of the embedded model with and without it, on held-out code.

    python benchmarks/token_healing.py [--examples 200] [--dump answers.jsonl]

Three cut sets from the standard-library modules the embedded model never trained on (seeded):
- inside an identifier (fim_synth's "mid-identifier" cut): the cursor strictly inside a NAME token
  of 4 or more characters (Python's own tokenizer says what a name is); the middle is the rest of
  that line;
- column 0 (fim_synth's "line-start" cut): the cursor at the start of an indented line, the prefix
  ending in its bare newline (what llama.vim sends on an auto-indented blank line); the middle is
  the whole line, indentation included, so the answer is also compared unstripped;
- at a token boundary: the cursor where tokenizing the whole file puts a token boundary, inside a
  line; the middle is the rest of the line. Here healing should change nothing: the healed answer
  is compared with the unhealed one.
Every example is completed greedily through the Engine (midfill.infill.complete_all), healed and
not (fim_prompt_healed with heal True / False: the healed request carries `healed_prompt_ids`),
with the single-line stop rule, as an editor's request would be.

"offered" counts the requests that carried a healed form (fim_prompt_healed gave one: the prefix
ends in a word character or a newline and indentation). "applied" counts those the engine switched
to it: `healing_wanted` called as Sequence.heal_if_wanted calls it, on the backed-off token and the
plain prompt's greedy first token, which is the unhealed run's first token (the same prompt,
prefilled alone, no prompt cache). As a check, an offered request not switched must give exactly
the unhealed answer: "offered, not applied K of N" is printed per set, and K should be N.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from midfill.data.fim_synth import FimExample, example_line_start, example_mid_identifier, rest_of_line
from midfill.data.installed import stdlib_documents
from midfill.engine import StopRules
from midfill.engine.healing import healing_wanted
from midfill.hub import EMBEDDED_MODEL
from midfill.infill import complete_all, sample_examples
from midfill.model import GPTRefactForCausalLM
from midfill.model.checkpoint import load_model
from midfill.prompts import fim_prompt_healed
from midfill.tokenizer import Tokenizer, load_tokenizer


@functools.cache
def token_boundaries(tok: Tokenizer, text: str) -> list[int]:
    """Character offsets where tokenizing all of `text` ends a token (none inside a UTF-8 character)."""
    char_at, position = {0: 0}, 0
    for i, char in enumerate(text):
        position += len(char.encode("utf-8"))
        char_at[position] = i + 1
    boundaries, position = [], 0
    for token in tok.encode(text):
        position += len(tok.token_bytes(token))
        if position in char_at:
            boundaries.append(char_at[position])
    assert position == len(text.encode("utf-8")), "the tokens do not spell the text"
    return boundaries


def cut_at_token_boundary(tok: Tokenizer) -> Callable[[str, random.Random], FimExample | None]:
    def cut(text: str, rng: random.Random) -> FimExample | None:
        for _ in range(20):
            cursor = rng.choice(token_boundaries(tok, text))
            line_start = text.rfind("\n", 0, cursor) + 1
            line_end = text.find("\n", cursor)
            line = text[line_start : len(text) if line_end < 0 else line_end]
            if line_start < cursor < line_start + len(line.rstrip()):
                return rest_of_line(text, cursor, "token boundary")
        return None

    return cut


@dataclass
class Outcome:
    answer: str
    offered: bool  # the request carried a healed form of its prompt
    first: int | None  # the first generated id (the stop id when that ended an empty answer)
    applied: str | None = None  # healed runs: the backed-off text the engine heals, None if it does not


def outcomes(model: GPTRefactForCausalLM, tok: Tokenizer, examples: list[FimExample], heal: bool, budget: int,
             max_new: int) -> list[Outcome]:  # fmt: skip
    """Greedy single-line answers for every example, batched through one engine (midfill.infill); it
    uses no prompt cache, or a healed prompt would reuse its unhealed twin's KV, and the comparison
    would then also measure the cache's arithmetic, not healing alone."""
    results = complete_all(model, tok, examples, StopRules.for_mode("single-line"), budget, max_new, heal)
    out = []
    for e, result in zip(examples, results):
        offered = fim_prompt_healed(tok, e.prefix, e.suffix, "spm", budget, heal)[1] is not None
        first = result.token_ids[0] if result.token_ids else tok.eot_id if result.finish_reason == "eos" else None
        out.append(Outcome(result.text, offered, first))
    return out


def mark_applied(tok: Tokenizer, examples: list[FimExample], off: list[Outcome], on: list[Outcome],
                 budget: int) -> None:  # fmt: skip
    """Fill in `applied` of the healed runs: what Sequence.heal_if_wanted decides, from the plain
    prompt's greedy first token (the unhealed run's first token)."""
    stop_ids = frozenset({tok.eot_id})
    for e, a, b in zip(examples, off, on):
        if not b.offered:
            continue
        plain, healed = fim_prompt_healed(tok, e.prefix, e.suffix, "spm", budget, heal=True)
        assert healed is not None and healed == plain[:-2] + plain[-1:], "SPM: the healed form drops the last prefix token"
        keep = next((i for i, (x, y) in enumerate(zip(plain, healed)) if x != y), len(healed))
        assert a.first is not None, "an unhealed answer with no first token"
        b.applied = healing_wanted(tok, plain[keep], a.first, stop_ids)


def percent(count: int, total: int) -> str:
    return f"{count / max(total, 1):.1%} ({count})"


def report(name: str, examples: list[FimExample], off: list[Outcome], on: list[Outcome]) -> list[str]:
    n = len(examples)
    rows = []
    for label, outcomes in (("off", off), ("on", on)):
        exact = sum(o.answer.strip() == e.middle.strip() for o, e in zip(outcomes, examples))
        unstripped = sum(o.answer == e.middle.rstrip() for o, e in zip(outcomes, examples))
        empty = sum(not o.answer.strip() for o in outcomes)
        offered = sum(o.offered for o in outcomes)
        applied = sum(o.applied is not None for o in outcomes)
        unstripped_cell = percent(unstripped, n) if name == "column 0" else "-"
        rows.append(f"| {name} | {n} | {label} | {percent(offered, n)} | {percent(applied, n)} | {percent(exact, n)} "
                    f"| {unstripped_cell} | {percent(empty, n)} |")  # fmt: skip
    return rows


def identical(name: str, off: list[Outcome], on: list[Outcome]) -> str:
    """How often the healed answer is the unhealed one: all, where a healed form was offered, where
    the engine switched to it, and where it was offered but not used (which should be every one)."""
    same = [a.answer == b.answer for a, b in zip(off, on)]

    def of(keep: list[bool]) -> str:
        picked = [s for s, k in zip(same, keep) if k]
        return f"{sum(picked)} of {len(picked)}"

    offered = [b.offered for b in on]
    applied = [b.applied is not None for b in on]
    kept = [o and not s for o, s in zip(offered, applied)]
    return (f"{name}, healed answer == unhealed answer: all {of([True] * len(same))}; offered a healed form "
            f"{of(offered)}; healing applied {of(applied)}; offered, not applied {of(kept)}")  # fmt: skip


def show(e: FimExample, off: Outcome, on: Outcome) -> str:
    return (f"  prefix tail {e.prefix[-40:]!r}, middle {e.middle!r}, healed {on.applied!r}\n"
            f"    unhealed answer {off.answer!r}\n    healed answer   {on.answer!r}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200, help="examples per cut set")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dump", type=Path, help="write every example and both answers here (JSON lines)")
    args = parser.parse_args()
    texts = [d.text for d in stdlib_documents(held_out=True)]
    tok = load_tokenizer(str(EMBEDDED_MODEL))
    cutters = {"inside a name": example_mid_identifier, "column 0": example_line_start,
               "token boundary": cut_at_token_boundary(tok)}  # fmt: skip
    sets = {name: sample_examples(texts, cut, args.examples, random.Random(args.seed + i))
            for i, (name, cut) in enumerate(cutters.items())}  # fmt: skip
    model = load_model(EMBEDDED_MODEL)
    rows, started, results = [], time.perf_counter(), {}
    for name, examples in sets.items():
        off = outcomes(model, tok, examples, False, args.prompt_tokens, args.max_new_tokens)
        on = outcomes(model, tok, examples, True, args.prompt_tokens, args.max_new_tokens)
        mark_applied(tok, examples, off, on, args.prompt_tokens)
        results[name] = off, on
        rows += report(name, examples, off, on)
        print(f"{name}: done at {time.perf_counter() - started:.0f} s", flush=True)
    print("\n| cut set | n | healing | healed form offered | healing applied | exact match | exact, unstripped "
          "| empty answers |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    for name, (off, on) in results.items():
        print(identical(name, off, on))
    if args.dump:
        with args.dump.open("w", encoding="utf-8") as f:
            for name, examples_of_set in sets.items():
                for e, a, b in zip(examples_of_set, *results[name]):
                    record = {"set": name, "prefix_tail": e.prefix[-80:], "middle": e.middle, "offered": b.offered,
                              "applied": b.applied, "answer_unhealed": a.answer, "answer_healed": b.answer}  # fmt: skip
                    f.write(json.dumps(record) + "\n")
    examples, (off, on) = sets["token boundary"], results["token boundary"]
    differing = [i for i, (a, b) in enumerate(zip(off, on)) if a.answer != b.answer]
    print(f"\ntoken boundary: {len(differing)} answers differ, e.g.:")
    for i in differing[:5]:
        print(show(examples[i], off[i], on[i]))


if __name__ == "__main__":
    main()
