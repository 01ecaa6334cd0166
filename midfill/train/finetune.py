"""Finetune a model on a team's repositories with LoRA: select files, hold some out, train on FIM, stop early.

The training is the trainer's loop (midfill.train.trainer.Run) over a LoRA-wrapped base model, with
batches cut from the repositories' files. Everything lands in one run folder (RunFolder):
files.json (each file accepted or rejected, and why), metrics.jsonl (its step-0 row is the base
model's), progress.json (read by the server's status page), checkpoints named by step and test
loss, checkpoint.pt (a killed run resumes from its last evaluation), the best adapter in adapter/,
the test-loss curve and REPORT.md (base vs finetuned test loss, and exact match on held-out lines:
whole lines from their indentation, and the rest of a line from a random column).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from midfill.data.batches import sample_seed
from midfill.data.documents import Document
from midfill.data.fim_synth import FimExample, SynthConfig, example_single, example_tokens, synthesize
from midfill.data.repo import collect, split_test_files
from midfill.errors import MidfillError
from midfill.files import write_text_atomic
from midfill.infill import exact_match, sample_examples
from midfill.model import GPTRefactForCausalLM
from midfill.model.checkpoint import load_model
from midfill.model.lora import LoraConfig, add_lora, load_adapter, merge_lora, save_adapter
from midfill.tokenizer import Tokenizer, load_tokenizer
from midfill.train.checkpoint import read_checkpoint
from midfill.train.config import LoopConfig
from midfill.train.plot import plot_losses
from midfill.train.run_folder import RunFolder
from midfill.train.trainer import Batch, Cluster, Report, Run


@dataclass
class FinetuneConfig:
    repos: list[str]
    out: str
    model: str
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.01
    lr: float = 3e-4
    warmup_steps: int = 20
    batch_size: int = 4
    block: int = 512
    epochs: int | None = None  # None: enough passes for about target_tokens, 1 to 10
    target_tokens: int = 400_000
    max_steps: int | None = None
    fim_rate: float = 0.9
    spm_rate: float = 0.5
    middle_only_loss: bool = False  # FIM examples: learn only the middle (default: every token but the sentinels)
    test_files: int | None = None
    eval_every: int = 25
    patience: int = 3  # evaluations without a better test loss before stopping
    loss_filter_z: float = 3.5  # robust z-score of a file's base-model loss above which it is rejected
    exact_match_examples: int = 100
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def loop(self, steps: int) -> LoopConfig:
        """The training loop's settings: AdamW on the adapter, warmup and cosine down to a tenth of lr,
        a test loss and a checkpoint every eval_every steps, no autocast (the model's own dtype)."""
        return LoopConfig(seed=self.seed, steps=steps, micro_batch=self.batch_size, block_size=self.block, optimizer="adamw",
                          lr=self.lr, min_lr=0.1 * self.lr, warmup_steps=self.warmup_steps, weight_decay=0.0,
                          betas=(0.9, 0.999), dtype="float32", early_dropout=0.0, eval_every=self.eval_every,
                          checkpoint_every=self.eval_every, patience=self.patience)  # fmt: skip


PROMPT_SHARE = 0.75  # of a block, for prefix and suffix; the rest is room for the middle and <|endoftext|>
FIM_TRIES = 3  # cuts tried per chunk before it is used as plain code


def chunks_of(text: str, max_chars: int) -> list[str]:
    """Consecutive runs of whole lines, each at most max_chars long (a longer line is cut)."""
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            out.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars and current:
            out.append(current)
            current = ""
        current += line
    if current.strip():
        out.append(current)
    return out


def file_losses(model: GPTRefactForCausalLM, tok: Tokenizer, docs: list[Document], block: int) -> list[float]:
    """Mean next-token loss of each file's first `block` tokens under the base model."""
    losses = []
    with torch.inference_mode():
        for doc in docs:
            ids = torch.tensor([tok.encode(doc.text)[: block + 1]], device=model.device)
            if ids.shape[1] < 2:
                losses.append(float("inf"))
                continue
            logits = model(ids[:, :-1]).float()
            losses.append(float(F.cross_entropy(logits[0], ids[0, 1:])))
    return losses


def loss_outliers(losses: list[float], z: float) -> list[str | None]:
    """A reason for each file whose loss is far above the others (robust z-score), else None."""
    finite = [x for x in losses if math.isfinite(x)]
    if len(finite) < 4:
        return [None if math.isfinite(x) else "no tokens" for x in losses]
    median = statistics.median(finite)
    spread = 1.4826 * statistics.median(abs(x - median) for x in finite) or 1e-6
    reasons = []
    for x in losses:
        if not math.isfinite(x):
            reasons.append("no tokens")
        elif (x - median) / spread > z and x > 1.25 * median:
            reasons.append(f"base-model loss {x:.2f} nats/token, far above the median {median:.2f} (data, not code?)")
        else:
            reasons.append(None)
    return reasons


def training_example(tok: Tokenizer, text: str, rng: random.Random, config: "FinetuneConfig") -> tuple[list[int], list[bool]]:
    """Token ids of one chunk and, per token, whether it is a target.

    With probability fim_rate the chunk becomes one FIM example cut and laid out exactly as an editor
    asks at inference (the card's synthetic kinds: an empty middle, the rest of a line, a block; the
    middle ends before its newline and is followed by <|endoftext|>), in SPM or PSM order; otherwise
    it is plain code. Middles cut elsewhere (at line starts, or including the newline) leave the
    model at token boundaries it never meets in an editor, and exact match falls while the loss falls.
    """
    sentinels = {tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id}
    if rng.random() < config.fim_rate:
        for _ in range(FIM_TRIES):
            example = synthesize(text, rng, SynthConfig())
            if example is None:
                break
            ids, middle = example_tokens(tok, example, rng.random() < config.spm_rate, int(config.block * PROMPT_SHARE))
            if len(ids) <= config.block + 1:
                return ids, middle if config.middle_only_loss else [t not in sentinels for t in ids]
    ids = tok.encode(text) + [tok.eot_id]
    return ids, [True] * len(ids)


class RepoData:
    """The trainer's batches from a repository's files: chunks of whole lines, each one training
    example, in an order reshuffled every epoch; the held-out files' chunks for the test loss."""

    def __init__(self, tok: Tokenizer, train_docs: list[Document], test_docs: list[Document], config: FinetuneConfig) -> None:
        self.tok, self.config = tok, config
        self.chunks = [c for d in train_docs for c in chunks_of(d.text, config.block * 3)]
        self.test_chunks = [c for d in test_docs for c in chunks_of(d.text, config.block * 3)]
        self.steps_per_epoch = math.ceil(len(self.chunks) / config.batch_size)
        self.eval_batches = math.ceil(len(self.test_chunks) / config.batch_size)

    def batch(self, step: int, samples: range) -> Batch:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.chunks)))
        random.Random(self.config.seed * 1000 + epoch).shuffle(order)
        start = position * self.config.batch_size
        return self.tensors([self.chunks[i] for i in order], step, range(start + samples.start, start + samples.stop))

    def held_out(self, index: int, samples: range) -> Batch:
        start = index * self.config.batch_size
        return self.tensors(self.test_chunks, -1, range(start + samples.start, start + samples.stop))

    def tensors(self, texts: list[str], step: int, indices: range) -> Batch:
        """Inputs, targets and loss mask [B, block] of texts[indices]; padding teaches nothing."""
        block, picked = self.config.block, [i for i in indices if i < len(texts)]
        inputs = torch.full((len(picked), block), self.tok.eot_id, dtype=torch.long)
        targets, mask = torch.zeros_like(inputs), torch.zeros(inputs.shape, dtype=torch.bool)
        for row, i in enumerate(picked):
            rng = random.Random(sample_seed(self.config.seed, step, i))
            ids, learn = training_example(self.tok, texts[i], rng, self.config)
            ids, learn = ids[: block + 1], learn[: block + 1]
            n = len(ids) - 1
            inputs[row, :n], targets[row, :n], mask[row, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:]), torch.tensor(learn[1:])
        return inputs, targets, mask


def line_examples(texts: list[str], count: int, seed: int) -> list[FimExample]:
    """Whole-line infills, as an editor meets them at the start of a line: the cursor after the
    line's indentation, the rest of that line missing, the file around it given."""
    rng, examples = random.Random(seed), []
    candidates = [(t, i) for t in texts for i, line in enumerate(t.split("\n")) if line.strip()]
    for text, i in rng.sample(candidates, min(count, len(candidates))):
        lines = text.split("\n")
        indent = len(lines[i]) - len(lines[i].lstrip())
        prefix = "\n".join(lines[:i] + [lines[i][:indent]])
        examples.append(FimExample(prefix, lines[i][indent:], "\n" + "\n".join(lines[i + 1 :]), "line"))
    return examples


def exact_matches(model: GPTRefactForCausalLM, tok: Tokenizer, examples: dict[str, list[FimExample]], block: int) -> dict[str, float]:
    """Share of held-out examples of each kind completed exactly (single-line stop rule, as an editor asks)."""
    model.eval()
    return {kind: exact_match(model, tok, of_kind, block, 48) for kind, of_kind in examples.items()}


def select_files(config: FinetuneConfig, model: GPTRefactForCausalLM, tok: Tokenizer) -> tuple[list[Document], list]:
    files = collect([Path(r) for r in config.repos], config.include, config.exclude)
    reasons = loss_outliers(file_losses(model, tok, files.accepted, config.block), config.loss_filter_z)
    accepted = [d for d, reason in zip(files.accepted, reasons) if reason is None]
    rejected = files.rejected + [(d.path, reason) for d, reason in zip(files.accepted, reasons) if reason is not None]
    if len(accepted) < 2:
        summary = ", ".join(sorted({reason for _, reason in rejected})[:4]) or "no files found"
        raise MidfillError(
            f"no usable code to finetune on: {len(accepted)} file(s) accepted, {len(rejected)} rejected ({summary}); "
            "point at a repository with source files, or widen --include"
        )
    return accepted, rejected


def finetune(config: FinetuneConfig, progress: Report | None = None, log: Callable[[str], None] = print,
             until_step: int | None = None, show_files: Callable[[list, list, list], None] | None = None) -> dict:  # fmt: skip
    """Run (or resume) the finetune; returns the report (empty when `until_step` paused it, checkpointed).

    show_files(train, test, rejected) is called once the files are chosen, before training starts.
    """
    folder = RunFolder(config.out)
    fresh = read_checkpoint(folder.checkpoint, config) is None  # a folder of another finetune is refused before it is touched
    device = torch.device(config.device)
    model = load_model(config.model, dtype="bfloat16" if device.type == "cuda" else "float32", device=device)
    tok = load_tokenizer(model.source)
    accepted, rejected = select_files(config, model, tok)
    train_docs, test_docs = split_test_files(accepted, config.seed, config.test_files)
    write_text_atomic(folder.files, json.dumps({
        "train": [d.path for d in train_docs], "test": [d.path for d in test_docs],
        "rejected": [{"path": p, "reason": r} for p, r in rejected],
    }, indent=2) + "\n")  # fmt: skip
    if show_files is not None:
        show_files(train_docs, test_docs, rejected)
    log(f"{len(train_docs)} training files, {len(test_docs)} test files, {len(rejected)} rejected (see {folder.files})")

    data, files, n = RepoData(tok, train_docs, test_docs, config), [d.text for d in test_docs], config.exact_match_examples
    examples = {"whole line": line_examples(files, n, config.seed),
                "rest of line": sample_examples(files, example_single, n, random.Random(config.seed))}  # fmt: skip
    train_tokens = sum(len(tok.encode(c)) for c in data.chunks)
    epochs = config.epochs or max(1, min(10, math.ceil(config.target_tokens / max(train_tokens, 1))))
    steps = epochs * data.steps_per_epoch if config.max_steps is None else min(config.max_steps, epochs * data.steps_per_epoch)
    if fresh:  # exact match in float32 for base and finetuned alike (finish() measures the merged adapter so)
        reference = model if model.dtype == torch.float32 else load_model(config.model, dtype="float32", device=device)
        base_match = exact_matches(reference, tok, examples, config.block)
        del reference
    lora = LoraConfig(config.r, config.alpha, config.dropout)
    torch.manual_seed(config.seed)
    add_lora(model, lora)

    def save(step: int, test_loss: float) -> None:
        meta = {"step": step, "test_loss": test_loss, "base_model": config.model}
        save_adapter(model, lora, folder.checkpoint_dir(step, test_loss), meta)

    run = Run(model, data, folder, config.loop(steps), config, Cluster(device=device), on_eval=save)
    if fresh:  # the new adapter changes nothing yet: this is the base model's test loss
        run.last_val_loss = run.eval_loss()
        folder.log({"step": 0, "val_loss": run.last_val_loss, "exact_match": base_match})
    else:
        log(f"resuming at step {run.step} of {steps}")
    if not run.fit(until_step, progress):
        return {}
    if run.stopped_early:
        log(f"stopped early at step {run.step}: the test loss has not improved for {config.patience} evaluations")
    return finish(config, run, tok, examples, {"train": len(train_docs), "test": len(test_docs), "rejected": len(rejected)})


def finish(config: FinetuneConfig, run: Run, tok: Tokenizer, examples: dict[str, list[FimExample]], files: dict[str, int]) -> dict:
    """Copy the best adapter to adapter/, measure it, write the curve and the report."""
    folder, best_dir = run.folder, run.folder.checkpoint_dir(run.best_step, run.best_val_loss)
    shutil.copytree(best_dir, folder.adapter, dirs_exist_ok=True)  # an adapter is always the same two files
    best = load_model(config.model, dtype="float32", device=config.device)
    load_adapter(best, folder.adapter)
    merge_lora(best)
    base = folder.rows()[0]
    report = {
        "base": {"test_loss": base["val_loss"], "exact_match": base["exact_match"]},
        "finetuned": {"test_loss": run.best_val_loss, "exact_match": exact_matches(best, tok, examples, config.block),
                      "adapter": str(folder.adapter), "checkpoint": str(best_dir)},  # fmt: skip
        "files": files,
        "steps": run.step,
    }
    write_text_atomic(folder.report, json.dumps(report, indent=2) + "\n")
    plot_losses(folder.curve(), folder.test_loss_plot, title="finetune: train and test loss")
    kinds = list(examples)
    rows = [(name, report[key]) for name, key in (("base", "base"), (f"finetuned (LoRA r={config.r})", "finetuned"))]
    write_text_atomic(folder.report_md, (
        "| model | test loss (nats/token) | " + " | ".join(f"{kind} exact match" for kind in kinds) + " |\n"
        + "|---" * (2 + len(kinds)) + "|\n"
        + "".join(f"| {name} | {r['test_loss']:.4f} | " + " | ".join(f"{r['exact_match'][k]:.1%}" for k in kinds) + " |\n"
                  for name, r in rows)
        + f"\nExact match on {len(examples[kinds[0]])} held-out examples of each kind (greedy, single-line stop rule).\n"
        f"\n{files['train']} training files, {files['test']} test files, {files['rejected']} rejected; "
        f"{run.step} steps. ![test loss]({folder.test_loss_plot.name})\n"
    ))  # fmt: skip
    folder.write_progress(state="done", step=run.step, total=run.step, test_loss=run.best_val_loss, eta_s=0)
    return report
