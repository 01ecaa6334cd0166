"""Single-line infill exact match of the embedded model in bf16, int8 and int4 on held-out code.

    python benchmarks/quantized_infill.py [--examples 300]

Issue 7's bar: quantized exact match within 1 point of bf16. Examples are the rest of a line from
a random column of the standard-library modules the embedded model never trained on (the cut the
recipe's own evaluation uses), completed greedily with the single-line stop rule.
"""

from __future__ import annotations

import argparse
import random

from midfill.data.fim_synth import example_single
from midfill.data.installed import stdlib_documents
from midfill.engine import StopRules
from midfill.hub import EMBEDDED_MODEL
from midfill.infill import complete, sample_examples
from midfill.model.checkpoint import load_model
from midfill.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    args = parser.parse_args()
    texts = [d.text for d in stdlib_documents(held_out=True)]
    examples = sample_examples(texts, example_single, args.examples, random.Random(0))
    tok = load_tokenizer(str(EMBEDDED_MODEL))
    rules = StopRules.for_mode("single-line")
    outputs: dict[str, list[str]] = {}
    for fmt in ("bf16", "int8", "int4"):
        model = load_model(EMBEDDED_MODEL, quantize=fmt)
        outputs[fmt] = [complete(model, tok, e, rules, args.prompt_tokens, 48) for e in examples]
        hits = sum(out == e.middle.rstrip() for out, e in zip(outputs[fmt], examples))
        same = sum(out == ref for out, ref in zip(outputs[fmt], outputs["bf16"]))
        print(f"{fmt}: exact match {hits}/{len(examples)} = {hits / len(examples):.1%}, "
              f"same completion as bf16 {same}/{len(examples)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
