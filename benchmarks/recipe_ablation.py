"""The card's recipe proven in small: each choice flipped alone, every row from the same compute.

    python benchmarks/recipe_ablation.py --out DIR [--rows card,adamw,...] [--markdown]

Rows (midfill.recipe.SMALL, the embedded recipe's pipeline at a size a CPU trains in minutes):
- card: Lion, early dropout, exact + MinHash dedup, then the finetune on 85% synthetic FIM + 15%
  instructions;
- adamw: AdamW (lr 3x Lion's, betas 0.9/0.95) in both stages;
- no-dropout: early dropout off;
- no-dedup: the same corpus packed without dedup (vendored and copied files kept);
- no-finetune: no finetune; its steps' tokens go to a longer pretraining instead;
- fim-only: the finetune on 100% synthetic FIM.
Runs with the same pretraining settings share one pretraining (card and fim-only). Each row is
evaluated on the recipe's held-out code (standard-library modules and packages no row trained
on): held-out loss, the infill metrics of eval/stopping.py, and HumanEval pass@1 (greedy, n=1) in
the fim and completion formats. Everything is cached in DIR: a rerun continues and reprints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path

from midfill.recipe import SMALL, run_recipe

ROWS = {
    "card": {},
    "adamw": {"optimizer": "adamw"},
    "no-dropout": {"early_dropout": 0.0},
    "no-dedup": {"dedup": False},
    "no-finetune": {"finetune": "none"},
    "fim-only": {"finetune": "fim"},
}
COLUMNS = [  # (key in the report, header, format)
    ("held_out_loss", "held-out loss", "{:.3f}"),
    ("line_exact_match", "single-line EM", "{:.1%}"),
    ("rest_of_line_exact_match", "rest-of-line EM", "{:.1%}"),
    ("empty_middle_accuracy", "empty-middle acc.", "{:.1%}"),
    ("multi_line_stopped_right", "multi-line right stop", "{:.1%}"),
    ("over_generation_chars", "over-generation (chars)", "{:.1f}"),
    ("humaneval_fim", "HumanEval fim", "{:.1%}"),
    ("humaneval_completion", "HumanEval completion", "{:.1%}"),
]


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cell(report: dict, key: str, fmt: str) -> str:
    value = report.get(key)
    return "–" if value is None else fmt.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default=",".join(ROWS), help="Comma-separated rows to run, of: " + ", ".join(ROWS))
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")
    results = {}
    for name in rows:
        recipe = dataclasses.replace(SMALL, **ROWS[name])
        began = time.perf_counter()
        results[name] = run_recipe(args.out, recipe, log=lambda message, name=name: print(f"[{name}] {message}", flush=True))
        print(f"[{name}] done in {time.perf_counter() - began:.0f} s", flush=True)
    (args.out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    shape = SMALL.shape
    print(f"\nAblation, {SMALL.describe()}; {cpu_name()}, {shape['n_embd']}x{shape['n_layer']}\n")
    print("| row | " + " | ".join(header for _, header, _ in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, report in results.items():
        print(f"| {name} | " + " | ".join(cell(report, key, fmt) for key, _, fmt in COLUMNS) + " |")


if __name__ == "__main__":
    main()
