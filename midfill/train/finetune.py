"""Finetune a model on a team's repositories with LoRA: select files, hold some out, train on FIM, stop early.

Everything lands in one output folder: files.json (each file accepted or rejected, and why),
metrics.jsonl, progress.json (read by the server's status page), checkpoints named by step and
test loss, state.pt (a killed run resumes from its last evaluation), the best adapter in adapter/,
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from midfill.data.documents import Document
from midfill.data.fim_synth import FimExample, SynthConfig, example_single, example_tokens, synthesize
from midfill.data.repo import collect, split_test_files
from midfill.engine import StopRules
from midfill.errors import MidfillError
from midfill.eval.stopping import complete, sample_examples
from midfill.files import atomic_path, write_text_atomic
from midfill.model import GPTRefactForCausalLM
from midfill.model.checkpoint import load_model
from midfill.tokenizer import Tokenizer, load_tokenizer
from midfill.train.lora import LoraConfig, adapter_state, add_lora, load_adapter, lora_layers, merge_lora, save_adapter
from midfill.train.plot import plot_losses
from midfill.train.schedule import warmup_cosine

Progress = Callable[[int, int, dict], None]  # (step, total steps, latest numbers)


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


def batch_tensors(tok: Tokenizer, texts: list[str], rng: random.Random, config: "FinetuneConfig",
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Inputs and targets [B, block]; targets are -100 where there is nothing to learn (padding, sentinels)."""
    block = config.block
    inputs = torch.full((len(texts), block), tok.eot_id, dtype=torch.long)
    targets = torch.full((len(texts), block), -100, dtype=torch.long)
    for row, text in enumerate(texts):
        ids, learn = training_example(tok, text, rng, config)
        ids, learn = ids[: block + 1], learn[: block + 1]
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor([t if keep else -100 for t, keep in zip(ids[1:], learn[1:])])
    return inputs.to(device), targets.to(device)


def masked_loss(model: GPTRefactForCausalLM, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


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


@dataclass
class TestSet:
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    examples: dict[str, list[FimExample]]  # exact-match examples by kind

    def loss(self, model: GPTRefactForCausalLM) -> float:
        model.eval()
        with torch.no_grad():
            total = sum(float(masked_loss(model, x, y)) for x, y in self.batches)
        return total / len(self.batches)


def make_test_set(tok: Tokenizer, docs: list[Document], config: FinetuneConfig, device: torch.device) -> TestSet:
    rng = random.Random(config.seed + 1)
    texts = [c for d in docs for c in chunks_of(d.text, config.block * 3)]
    batches = [batch_tensors(tok, texts[i : i + config.batch_size], rng, config, device)
               for i in range(0, len(texts), config.batch_size)]  # fmt: skip
    files = [d.text for d in docs]
    return TestSet(batches, {"whole line": line_examples(files, config.exact_match_examples, config.seed),
                             "rest of line": sample_examples(files, example_single, config.exact_match_examples, random.Random(config.seed))})  # fmt: skip


def exact_match(model: GPTRefactForCausalLM, tok: Tokenizer, test: TestSet, block: int) -> dict[str, float]:
    """Share of held-out examples of each kind completed exactly (single-line stop rule, as an editor asks)."""
    model.eval()
    rules = StopRules.for_mode("single-line")
    return {kind: sum(complete(model, tok, e, rules, block, 48) == e.middle.rstrip() for e in examples) / max(len(examples), 1)
            for kind, examples in test.examples.items()}  # fmt: skip


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


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


def finetune(config: FinetuneConfig, progress: Progress | None = None, log: Callable[[str], None] = print,
             until_step: int | None = None, show_files: Callable[[list, list, list], None] | None = None) -> dict:  # fmt: skip
    """Run (or resume) the finetune; returns the report (empty when `until_step` stopped it early, as a kill would).

    show_files(train, test, rejected) is called once the files are chosen, before training starts.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    state = torch.load(state_path, weights_only=False) if state_path.is_file() else None
    if state is not None and state["config"] != config.to_dict():
        raise MidfillError(f"{out} holds a finetune with other settings; use a new --out or the same options")

    device = torch.device(config.device)
    model = load_model(config.model, dtype="bfloat16" if device.type == "cuda" else "float32", device=device)
    tok = load_tokenizer(model.source)
    accepted, rejected = select_files(config, model, tok)
    train_docs, test_docs = split_test_files(accepted, config.seed, config.test_files)
    write_json(out / "files.json", {
        "train": [d.path for d in train_docs], "test": [d.path for d in test_docs],
        "rejected": [{"path": p, "reason": r} for p, r in rejected],
    })  # fmt: skip
    if show_files is not None:
        show_files(train_docs, test_docs, rejected)
    log(f"{len(train_docs)} training files, {len(test_docs)} test files, {len(rejected)} rejected (see {out / 'files.json'})")

    test = make_test_set(tok, test_docs, config, device)
    chunks = [c for d in train_docs for c in chunks_of(d.text, config.block * 3)]
    train_tokens = sum(len(tok.encode(c)) for c in chunks)
    epochs = config.epochs or max(1, min(10, math.ceil(config.target_tokens / max(train_tokens, 1))))
    steps_per_epoch = math.ceil(len(chunks) / config.batch_size)
    total = epochs * steps_per_epoch if config.max_steps is None else min(config.max_steps, epochs * steps_per_epoch)

    if state is None:
        base_loss = test.loss(model)
        # exact match in float32 for base and finetuned alike (finish() measures the merged adapter so)
        reference = model if model.dtype == torch.float32 else load_model(config.model, device=device)
        base_match = exact_match(reference, tok, test, config.block)
        del reference
        state = {"config": config.to_dict(), "step": 0, "best": (math.inf, None), "bad_evals": 0,
                 "base": {"test_loss": base_loss, "exact_match": base_match}, "last_test": base_loss}  # fmt: skip
        with open(out / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 0, "val_loss": base_loss}) + "\n")
    lora = LoraConfig(config.r, config.alpha, config.dropout)
    torch.manual_seed(config.seed)
    add_lora(model, lora)
    params = [p for layer in lora_layers(model).values() for p in (layer.lora_a, layer.lora_b)]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if "adapter" in state:
        for name, layer in lora_layers(model).items():
            layer.lora_a.data.copy_(state["adapter"][f"{name}.lora_a"])
            layer.lora_b.data.copy_(state["adapter"][f"{name}.lora_b"])
        optimizer.load_state_dict(state["optimizer"])
        log(f"resuming at step {state['step']} of {total}")

    step, started = state["step"], time.perf_counter()
    first_step = step
    while step < total and (until_step is None or step < until_step):
        epoch, position = divmod(step, steps_per_epoch)
        order = list(range(len(chunks)))
        random.Random(config.seed * 1000 + epoch).shuffle(order)
        picked = [chunks[i] for i in order[position * config.batch_size : (position + 1) * config.batch_size]]
        rng = random.Random(config.seed * 1_000_003 + step)
        torch.manual_seed(config.seed + step)  # LoRA dropout: the same draws after a resume
        inputs, targets = batch_tensors(tok, picked, rng, config, device)
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, total, config.lr, 0.1 * config.lr, config.warmup_steps)
        loss = masked_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        numbers = {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **numbers}) + "\n")
        if step % config.eval_every == 0 or step == total:
            test_loss = test.loss(model)
            numbers["test_loss"] = state["last_test"] = test_loss
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "val_loss": test_loss}) + "\n")
            checkpoint = out / "checkpoints" / f"step-{step:06d}-loss-{test_loss:.4f}"
            save_adapter(model, lora, checkpoint, {"step": step, "test_loss": test_loss, "base_model": config.model})
            if test_loss < state["best"][0]:
                state["best"], state["bad_evals"] = (test_loss, str(checkpoint)), 0
            else:
                state["bad_evals"] += 1
            state.update(step=step, adapter=adapter_state(model), optimizer=optimizer.state_dict())
            with atomic_path(state_path) as tmp:
                torch.save(state, tmp)
            if state["bad_evals"] >= config.patience:
                log(f"stopping early at step {step}: the test loss has not improved for {config.patience} evaluations")
                total = step
        elapsed = time.perf_counter() - started
        write_json(out / "progress.json", {"state": "running", "step": step, "total": total, **numbers,
                                           "test_loss": state["last_test"],
                                           "eta_s": elapsed / max(step - first_step, 1) * (total - step)})  # fmt: skip
        if progress is not None:
            progress(step, total, numbers)
    if step < total:  # stopped by until_step: the state on disk is the resume point
        return {}
    return finish(config, out, tok, test, state, train_docs, test_docs, rejected)


def finish(config: FinetuneConfig, out: Path, tok: Tokenizer, test: TestSet, state: dict, train_docs: list[Document],
           test_docs: list[Document], rejected: list) -> dict:  # fmt: skip
    """Copy the best adapter to adapter/, measure it, write the curve and the report."""
    best_loss, best_dir = state["best"]
    adapter_dir = out / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    shutil.copytree(best_dir, adapter_dir)
    best = load_model(config.model, device=config.device)
    load_adapter(best, adapter_dir)
    merge_lora(best)
    report = {
        "base": state["base"],
        "finetuned": {"test_loss": best_loss, "exact_match": exact_match(best, tok, test, config.block),
                      "adapter": str(adapter_dir), "checkpoint": best_dir},  # fmt: skip
        "files": {"train": len(train_docs), "test": len(test_docs), "rejected": len(rejected)},
        "steps": state["step"],
    }
    write_json(out / "report.json", report)
    plot_losses(out / "metrics.jsonl", out / "test_loss.png", title="finetune: train and test loss")
    kinds = list(test.examples)
    rows = [(name, report[key]) for name, key in (("base", "base"), (f"finetuned (LoRA r={config.r})", "finetuned"))]
    write_text_atomic(out / "REPORT.md", (
        "| model | test loss (nats/token) | " + " | ".join(f"{kind} exact match" for kind in kinds) + " |\n"
        + "|---" * (2 + len(kinds)) + "|\n"
        + "".join(f"| {name} | {r['test_loss']:.4f} | " + " | ".join(f"{r['exact_match'][k]:.1%}" for k in kinds) + " |\n"
                  for name, r in rows)
        + f"\nExact match on {len(test.examples[kinds[0]])} held-out examples of each kind (greedy, single-line stop rule).\n"
        f"\n{len(train_docs)} training files, {len(test_docs)} test files, {len(rejected)} rejected; "
        f"{state['step']} steps. ![test loss](test_loss.png)\n"
    ))  # fmt: skip
    write_json(out / "progress.json", {"state": "done", "step": state["step"], "total": state["step"],
                                       "test_loss": best_loss, "eta_s": 0})  # fmt: skip
    return report
