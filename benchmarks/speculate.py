"""Speculation benchmark: decode tokens/s with prompt-lookup drafts on and off, in one run.

    python benchmarks/speculate.py [--examples 24] [--rounds 2] [--real-shape-layers 32]

1. The embedded model (real acceptance rates), FIM requests cut from held-out standard-library
   code, as an editor sends them (SPM order, the line's end as the stop):
   - edit: the middle is a line whose text also appears elsewhere in the file (re-typing a line,
     a repeated pattern, a renamed call written again);
   - fresh: the middle's text appears nowhere else in the file (nothing to copy).
2. The real Refact-1.6B shape with random weights, packed bf16 (the default path): the cost side.
   Random weights accept nothing on their own, so the drafts replay the model's own greedy output
   (recorded with speculation off): every draft is right, and the ratio is what verifying k rows
   in one pass buys on this machine.
Speculation on and off alternate (A B A B) so the machine's drift moves both. Tokens/s counts
the tokens after the first over the time after it (the prefill is the same either way).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import midfill  # noqa: E402
from benchmarks.decode import build  # noqa: E402
from midfill.data.installed import stdlib_documents  # noqa: E402
from midfill.engine import speculate  # noqa: E402
from midfill.engine.request import Finished, GenerationRequest  # noqa: E402
from midfill.engine.scheduler import Engine  # noqa: E402
from midfill.engine.stops import StopRules  # noqa: E402
from midfill.hub import EMBEDDED_MODEL  # noqa: E402
from midfill.kernels import native  # noqa: E402
from midfill.prompts import fim_prompt  # noqa: E402


def cut_examples(kind: str, count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prefix, middle line, suffix) from held-out files: middles that repeat elsewhere, or that do not."""
    examples = []
    for doc in stdlib_documents(held_out=True):
        lines = doc.text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            text = line.strip()
            if len(text) < 24 or i < 20:
                continue
            elsewhere = any(text in other for j, other in enumerate(lines) if j != i)
            if elsewhere == (kind == "edit"):
                examples.append(("".join(lines[:i]) + line[: len(line) - len(line.lstrip())], line.lstrip(), "".join(lines[i + 1 :])))
    random.Random(seed).shuffle(examples)
    return examples[:count]


def generate(engine: Engine, requests: list[GenerationRequest]) -> list:
    results = []
    for request in requests:
        engine.submit(request, lambda event: results.append(event.result) if isinstance(event, Finished) else None)
    engine.drive()
    return results


def tokens_per_s(results: list) -> float:
    tokens = sum(max(r.completion_tokens - 1, 0) for r in results)
    return tokens / (sum(r.predicted_ms for r in results) / 1000)


def embedded_rows(examples: int, rounds: int) -> list[dict]:
    model, tok = midfill.load_model(EMBEDDED_MODEL), midfill.load_tokenizer(EMBEDDED_MODEL)
    rows = []
    for kind in ("edit", "fresh"):
        cut = cut_examples(kind, examples)

        def requests(on: bool) -> list[GenerationRequest]:
            return [GenerationRequest(fim_prompt(tok, prefix[-3000:], suffix[:1000], "spm", budget=1024 - 48), 48,
                                      rules=StopRules(single_line=True), stop_ids=frozenset({tok.eot_id}), speculate=on)
                    for prefix, _, suffix in cut]  # fmt: skip

        engines = {on: Engine(model, tok, max_batch=1, speculate=on) for on in (False, True)}
        speeds = {False: [], True: []}
        for _ in range(rounds):
            for on in (False, True):
                results = generate(engines[on], requests(on))
                speeds[on].append(tokens_per_s(results))
                if on:
                    drafted, accepted = sum(r.drafted_tokens for r in results), sum(r.accepted_tokens for r in results)
        rows.append({"model": "embedded", "workload": kind, "examples": len(cut), "off": statistics.median(speeds[False]),
                     "on": statistics.median(speeds[True]), "drafted": drafted, "accepted": accepted})  # fmt: skip
    return rows


def replayed_row(layers: int, rounds: int, new_tokens: int) -> dict:
    """The 1.6B shape, packed bf16, drafts replaying its own greedy output: the cost of verification."""
    model = build("bf16", layers)
    prompt = torch.randint(1, model.config.vocab_size, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    request = lambda on: GenerationRequest(prompt, new_tokens, stop_ids=frozenset(), cache_prompt=False, speculate=on)  # noqa: E731
    engines = {on: Engine(model, None, max_batch=1, ctx=1024, speculate=on) for on in (False, True)}
    replay = generate(engines[False], [request(False)])[0].token_ids
    original = speculate.NgramIndex.draft

    def replayed(index: speculate.NgramIndex, limit: int) -> list[int]:
        done = len(index.tokens) - len(prompt)  # tokens generated so far: the draft is what came next last time
        return replay[done : done + limit]

    speeds = {False: [], True: []}
    for _ in range(rounds):
        for on in (False, True):
            speculate.NgramIndex.draft = replayed if on else original
            try:
                result = generate(engines[on], [request(on)])[0]
            finally:
                speculate.NgramIndex.draft = original
            assert result.token_ids == replay, "speculation changed the greedy output"
            speeds[on].append(tokens_per_s([result]))
    return {"model": f"1.6B shape ({layers} layers), bf16 packed", "workload": "replayed (every draft right)", "examples": 1,
            "off": statistics.median(speeds[False]), "on": statistics.median(speeds[True]),
            "drafted": result.drafted_tokens, "accepted": result.accepted_tokens}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=24, help="FIM requests per workload")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--real-shape-layers", type=int, default=32, help="layers of the 1.6B shape (0: skip it)")
    parser.add_argument("--new", type=int, default=48, help="tokens generated on the 1.6B shape")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; torch threads: {torch.get_num_threads()}; kernels: {native.variant()}")
    rows = embedded_rows(args.examples, args.rounds)
    if args.real_shape_layers:
        rows.append(replayed_row(args.real_shape_layers, args.rounds, args.new))
    print("\n| model | workload | requests | tok/s off | tok/s on | on / off | drafted | accepted |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['workload']} | {r['examples']} | {r['off']:.1f} | {r['on']:.1f} | {r['on'] / r['off']:.2f}x | "
              f"{r['drafted']} | {r['accepted']} |")


if __name__ == "__main__":
    main()
