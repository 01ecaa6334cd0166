"""MODEL_CARD.md for the embedded model, written from the recipe's own records."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from midfill.train.config import TrainConfig
from midfill.train.run_folder import RunFolder

# StoppingReport's fields; an eval.json from before a metric existed shows "–" for it
METRICS = [
    ("line_exact_match", "single-line infill exact match", "{:.1%}"),
    ("rest_of_line_exact_match", "rest-of-line exact match", "{:.1%}"),
    ("mid_identifier_exact_match", "mid-identifier rest-of-line exact match, healing off", "{:.1%}"),
    ("mid_identifier_exact_match_healed", "mid-identifier rest-of-line exact match, healing on", "{:.1%}"),
    ("line_start_exact_match", "line-start exact match (indentation included), healing off", "{:.1%}"),
    ("line_start_exact_match_healed", "line-start exact match (indentation included), healing on", "{:.1%}"),
    ("multi_line_stopped_right", 'multi-line infill "stopped at the right line"', "{:.1%}"),
    ("empty_middle_accuracy", "empty-middle accuracy", "{:.1%}"),
    ("over_generation_chars", "mean characters generated past the true middle", "{:.1f}"),
    ("held_out_loss", "held-out loss (nats/token, plain left-to-right text)", "{:.3f}"),
    ("humaneval_fim", "HumanEval pass@1, fim format (greedy, n=1)", "{:.1%}"),
    ("humaneval_completion", "HumanEval pass@1, completion format (greedy, n=1)", "{:.1%}"),
]


COLUMNS = (("base", "base model"), ("pretrain", "before finetune"), ("finetune", "after finetune"))


def metrics_table(report: dict) -> str:
    """The card's metric table from eval.json's reports: the base model's (when the recipe continued
    one), then before and after the finetune."""

    def cell(run: dict, key: str, fmt: str) -> str:
        return "–" if run.get(key) is None else fmt.format(run[key])

    columns = [(key, title) for key, title in COLUMNS if key in report]
    head = "| metric | " + " | ".join(title for _, title in columns) + " |\n|---|" + "---|" * len(columns)
    return head + "".join(f"\n| {label} | " + " | ".join(cell(report[c], key, fmt) for c, _ in columns) + " |"
                          for key, label, fmt in METRICS)  # fmt: skip


def corpus_summary(out: Path, python: str, held_out: tuple[str, ...]) -> tuple[str, str]:
    """(the Data section's text, the training data's licences), from corpus-manifest.json; a recipe
    folder from before it (the standard library alone) gets the text of its time."""
    path = out / "corpus-manifest.json"
    modules = ", ".join(f"`{h}`" for h in held_out)
    if not path.exists():
        return (f"The Python {python} standard library's `.py` sources and test suites (PSF License 2.0). Held out for "
                f"evaluation, never trained on, and their tests left out too: {modules}.", "Python standard library, PSF License 2.0")  # fmt: skip
    manifest = json.loads(path.read_text())
    packages = manifest["packages"]
    train = [p for p in packages if p["included"] and "train" in p["splits"] and p["name"] != "python-stdlib"]
    held = [p for p in packages if p["included"] and "held-out" in p["splits"] and "train" not in p["splits"]]
    excluded = [p for p in packages if not p["included"]]
    totals = manifest["totals"]["train"]
    names = ", ".join(f"{p['name']} {p['version']}" for p in train)
    text = (f"The code `pip install -e .` puts on every machine: the Python {python} standard library's `.py` sources and "
            f"test suites, and the `.py` files of the {len(train)} permissively licensed distributions in midfill's own "
            f"dependency closure ({names}): {totals['files']:,} files, "
            f"{totals['bytes'] / 1e6:,.1f} MB; every file's sha256 is in `corpus-manifest.json`. Never trained on: "
            + ", ".join(f"{p['name']} ({p['reason']})" for p in excluded)
            + f". Held out for evaluation: the standard-library modules {modules} (and their tests) and "
            + ", ".join(f"{p['name']} {p['version']}" for p in held) + ".")  # fmt: skip
    licences = sorted({p["license"] for p in train} | {"PSF-2.0"})
    return text, "permissive only: " + ", ".join(licences)


def run_summary(run: RunFolder) -> dict:
    rows = run.rows()
    checkpoint_config = json.loads((run.model / "config.json").read_text())
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    tail = rows[-20:]
    return {"steps": len(rows), "train_loss": sum(r["loss"] for r in tail) / len(tail), "val_loss": vals[-1] if vals else None,
            "config": checkpoint_config}


def loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def tokens_per_step(config: TrainConfig) -> int:
    return config.micro_batch * config.grad_accum * config.block_size


def pretraining_line(pre: TrainConfig, steps: int, base: Path | None) -> str:
    """The card's pretraining step: from scratch with early dropout, or continued from a base model."""
    seen = f"{steps:,} steps of {tokens_per_step(pre):,} tokens ({steps * tokens_per_step(pre):,} tokens seen), Lion (lr {pre.lr} -> {pre.min_lr}, warmup {pre.warmup_steps})"
    if base is None:
        return f"**Pretraining**: {seen}, early dropout {pre.early_dropout} over the first {pre.early_dropout_fraction:.0%} of steps"
    return (f"**Continued pretraining** of the base model (its `model.safetensors` has sha256 "
            f"`{hashlib.sha256((base / 'model.safetensors').read_bytes()).hexdigest()}`), on this corpus with its tokenizer: {seen}, no early dropout")


def model_card(out: Path, n_params: int, report: dict, pre: TrainConfig, fine: TrainConfig, held_out: tuple[str, ...], seed: int,
               base: Path | None = None) -> str:
    """The card's markdown; `out` is the recipe folder with the data manifests and both runs; `base`
    the model the recipe continued, if it did."""
    pre_data = json.loads((out / "pretrain-data" / "manifest.json").read_text())
    fine_data = json.loads((out / "finetune-data" / "manifest.json").read_text())
    pre_run, fine_run = run_summary(RunFolder(out / "pretrain")), run_summary(RunFolder(out / "finetune"))
    source = out / "corpus-source.json"  # older recipe folders lack it: then this Python's version
    python = json.loads(source.read_text())["python"] if source.exists() else platform.python_version()
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(fine_data["examples_per_kind"].items()))
    counts = ", ".join(f"{n} {kind}" for kind, n in report["pretrain"]["examples"].items())
    shape = pre.shape()
    corpus, licences = corpus_summary(out, python, held_out)
    chat = report["finetune"].get("chat_answer")
    reproduce_base = ", BASE being the model with the sha256 above (the embedded model that this one replaced, in git history)"
    chat_section = "" if chat is None else f"""
## Chat, as it comes

`midfill chat --message 'How do I sort a list in Python?'` (greedy) answers:

```text
{chat.strip()}
```
"""
    return f"""# midfill embedded model

A small code model of the Refact-1.6B architecture (`GPTRefactForCausalLM`: ALiBi, multi-query
attention, bias-free LayerNorm, SwiGLU), trained end to end by midfill's own pipeline so that
`midfill serve`, `complete` and `chat` work offline on a fresh machine. It is a demonstration model:
it completes Python in the style of the standard library, it is not a general assistant.

| | |
|---|---|
| parameters | {n_params:,} (n_embd {shape['n_embd']}, {shape['n_layer']} layers, {shape['n_head']} heads, one K/V head) |
| context | {shape['n_positions']} tokens (trained on {pre.block_size}-token blocks) |
| vocabulary | {pre_data['vocab_size']:,} BPE tokens trained by `midfill tokenizer train`'s method (padded to {pre_run['config']['vocab_size']:,}); Refact's special tokens at ids 0..18 |
| weights | bfloat16 safetensors |
| seed | {seed} |

## Data

{corpus}

Passed through `midfill data build` (filters, exact and MinHash dedup): {pre_data['stages']['filter']['docs_in']:,}
files in, {pre_data['stages']['dedup']['docs_out']:,} kept, {sum(s['tokens'] for s in pre_data['splits']['train']):,} training tokens.

## Training

1. {pretraining_line(pre, pre_run['steps'], base)},
   FIM rate {pre.fim.fim_rate} (SPM {pre.fim.spm_rate}). Final train loss
   {pre_run['train_loss']:.3f}, val-split loss {loss(pre_run['val_loss'])} (nats/token).
2. **Finetune** on the card's mix, from the same training modules: {kinds}
   ({fine_data['config']['instruct_fraction']:.0%} instruction pairs in the chat format, the rest synthetic FIM whose middle
   ends at a line end, a blank line or a dedent, followed by <|endoftext|>). {fine_run['steps']:,} steps of {tokens_per_step(fine):,}
   tokens ({fine_run['steps'] * tokens_per_step(fine):,} tokens seen), Lion lr {fine.lr} -> {fine.min_lr}, loss on the
   answers only. Final train loss {fine_run['train_loss']:.3f}, val-split loss {loss(fine_run['val_loss'])}.

Loss curves: `loss-pretrain.png`, `loss-finetune.png`.

## Metrics on the held-out modules (greedy, SPM prompts)

Examples cut from the held-out modules where an editor's cursor would be (`midfill/eval/stopping.py`):
{counts}. Exact match uses the single-line stop rule, as an editor does, and is unstripped: single-line
is a whole line from its indentation, rest-of-line from a column inside it, mid-identifier from inside
a name, line-start from column 0 of an indented line (the prefix ends in its newline). Healing on:
the request carries its token-healed prompt, as `midfill serve` sends by default. The last three
let only the model's own <|endoftext|> end a completion (at most 96 tokens).

{metrics_table(report)}
{chat_section}
## Licence

Training data: {licences}. Weights: Apache-2.0, like midfill.
Reproduce with `midfill recipe embedded --out DIR{" --continue-from BASE" if base else ""}` (resumable, seeded){reproduce_base if base else ""}.
"""
