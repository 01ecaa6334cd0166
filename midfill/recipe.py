"""`midfill recipe embedded`: the whole pipeline that makes the model shipped inside midfill.

Data: the code `pip install -e .` puts on every machine (midfill.data.installed): the Python standard
library's sources and test suites (PSF licence) and the permissively licensed packages of midfill's
dependency closure, minus what is held out for evaluation (the HELD_OUT modules, their tests, which
would show the model the held-out code's behaviour, and HELD_OUT_PACKAGES) and minus the packages
the evaluations read. Steps, each skipped when its output exists and each resumable: corpus ->
tokenizer -> data build -> pretraining -> finetune mix (85% synthetic FIM, 15% instructions) ->
finetune -> evaluation before and after -> a bf16 export. Everything is seeded; rerunning the
command continues where it stopped.

With a base model (`--continue-from`), the recipe continues it instead of starting afresh: its
tokenizer is kept, pretraining starts from its weights at the finetune's learning rate and without
early dropout (which is for the first steps of a new network), and the base is evaluated on the
same held-out code, so the card shows what the continuation bought. A CPU can afford this where a
pretraining from scratch on the whole corpus takes a GPU.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from midfill.data.build import BuildConfig, build_dataset
from midfill.data.documents import Document
from midfill.data.filters import FilterConfig, reject_reason
from midfill.data.finetune_mix import MixConfig, build_finetune_mix
from midfill.data.installed import HELD_OUT, PERMISSIVE, Package, installed_packages, write_installed_corpus
from midfill.engine.decode import generate
from midfill.errors import MidfillError
from midfill.eval.heldout_loss import held_out_blocks, held_out_loss
from midfill.eval.runner import EvalConfig, run_eval
from midfill.eval.stopping import evaluate_stopping, held_out_examples
from midfill.eval.tasks import humaneval_tasks
from midfill.files import write_text_atomic
from midfill.model import GPTRefactForCausalLM
from midfill.model.checkpoint import load_model, save_model
from midfill.model_card import model_card
from midfill.prompts import ChatMessage, chat_prompt
from midfill.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from midfill.train.config import TrainConfig
from midfill.train.run_folder import RunFolder
from midfill.train.trainer import train

VOCAB_SIZE = 8192
SEED = 1234
SORT_QUESTION = "How do I sort a list in Python?"  # the model card shows the chat answer to it, as it comes
LEARNING_RATES = {"lion": (6e-4, 2e-4), "adamw": (1.8e-3, 6e-4)}  # (pretrain, finetune); AdamW's 3x Lion's, as the Lion paper advises
BETAS = {"lion": (0.9, 0.99), "adamw": (0.9, 0.95)}
Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Every choice that decides the model. EMBEDDED is the shipped model; the ablation
    (benchmarks/recipe_ablation.py) runs SMALL with one choice changed per row."""

    shape: dict[str, int]
    pretrain_steps: int
    finetune_steps: int
    micro_batch: int = 32  # both stages: a finetune step costs what a pretraining step does
    block_size: int = 512
    optimizer: str = "lion"
    early_dropout: float = 0.1
    dedup: bool = True
    finetune: str = "card"  # "card": 85% synthetic FIM + 15% instructions; "fim": 100% synthetic FIM; "none"
    finetune_examples: int = 20000
    eval_per_kind: int = 100
    humaneval_tokens: int = 256
    humaneval_problems: int = 164  # all of them; fewer only where a test needs the pipeline, not the number
    seed: int = SEED
    base: str | None = None  # a model folder to continue (its tokenizer and weights); None: a new network

    def __post_init__(self) -> None:
        if self.finetune not in ("card", "fim", "none"):
            raise MidfillError(f"unknown finetune {self.finetune!r}; use card, fim or none")

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.block_size

    def describe(self) -> str:
        return (f"pretraining {self.pretrain_steps} steps + finetune {self.finetune_steps} steps of {self.tokens_per_step:,} tokens "
                f"({(self.pretrain_steps + self.finetune_steps) * self.tokens_per_step:,} tokens per row)")

    @property
    def pretraining_steps(self) -> int:
        """Without a finetune, its steps go to pretraining: every recipe spends the same compute."""
        return self.pretrain_steps + (self.finetune_steps if self.finetune == "none" else 0)

    def pretrain_key(self) -> str:
        """Names the pretraining run by what decides it, so rows that share one reuse it."""
        dedup = "dedup" if self.dedup else "nodedup"
        return f"pretrain-{self.optimizer}-dropout{self.early_dropout}-{dedup}-{self.pretraining_steps}"


EMBEDDED = Recipe(shape=dict(n_embd=384, n_layer=8, n_head=6, n_positions=1024), pretrain_steps=2500, finetune_steps=600)
CONTINUED = replace(EMBEDDED, pretrain_steps=1000, finetune_steps=400, early_dropout=0.0)  # with base= set: ~2 h on 2 AMX cores
SMALL = Recipe(shape=dict(n_embd=192, n_layer=4, n_head=4, n_positions=1024), pretrain_steps=160, finetune_steps=40,
               micro_batch=8, finetune_examples=4000, eval_per_kind=50, humaneval_tokens=128)


def filters() -> FilterConfig:
    """The data filters, letting through every licence the corpus admits (some the default list lacks)."""
    return FilterConfig(licenses=set(PERMISSIVE))


def write_corpus(out: Path, packages: list[Package] | None = None) -> None:
    """corpus-train.jsonl, corpus-heldout.jsonl and their corpus-manifest.json (of installed_packages()
    unless given), beside a record of the Python whose standard library it is (the model card names
    that one, not whichever Python exports the model later)."""
    source = out / "corpus-source.json"
    if not source.exists():
        write_text_atomic(source, json.dumps({"python": platform.python_version()}) + "\n")
    if not ((out / "corpus-train.jsonl").exists() and (out / "corpus-heldout.jsonl").exists()):
        packages = installed_packages() if packages is None else packages
        write_installed_corpus(out / "corpus-train.jsonl", out / "corpus-heldout.jsonl", out / "corpus-manifest.json", packages)


def corpus_texts(out: Path, split: str) -> list[str]:
    return [json.loads(line)["content"] for line in (out / f"corpus-{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def pretrain_data(out: Path, recipe: Recipe) -> Path:
    return out / ("pretrain-data" if recipe.dedup else "pretrain-data-nodedup")


def finetune_data(out: Path, recipe: Recipe) -> Path:
    return out / ("finetune-data" if recipe.finetune == "card" else "finetune-data-fim")


def prepare_pretraining(out: Path, recipe: Recipe = EMBEDDED, log: Log = print) -> None:
    """Corpus, tokenizer and token shards for pretraining (each step skipped once done)."""
    out.mkdir(parents=True, exist_ok=True)
    write_corpus(out)
    tokenizer_path = out / "tokenizer.json"
    if recipe.base:  # the base's embeddings are of its tokens
        base_tokenizer = Path(recipe.base) / "tokenizer.json"
        if not tokenizer_path.exists():
            shutil.copy(base_tokenizer, tokenizer_path)
        elif tokenizer_path.read_bytes() != base_tokenizer.read_bytes():
            raise MidfillError(f"{out} holds another tokenizer than {recipe.base}'s; continue it in a new --out")
    elif not tokenizer_path.exists():
        log("training the tokenizer")
        train_tokenizer(iter(corpus_texts(out, "train")), VOCAB_SIZE).save(tokenizer_path)
    data = pretrain_data(out, recipe)
    if not (data / "manifest.json").exists():
        log(f"building the pretraining data ({'with' if recipe.dedup else 'without'} dedup)")
        build_dataset([str(out / "corpus-train.jsonl")], data, tokenizer_path, BuildConfig(filters(), dedup=recipe.dedup, val_fraction=0.02))


def prepare_finetuning(out: Path, recipe: Recipe = EMBEDDED, log: Log = print) -> None:
    """The finetune mix from the training files: 85% synthetic FIM + 15% instructions, or all FIM."""
    data = finetune_data(out, recipe)
    if (data / "manifest.json").exists():
        built = json.loads((data / "manifest.json").read_text())["config"]["examples"]
        if built != recipe.finetune_examples:  # recipes of other sizes share a folder's corpus, not its mix
            raise MidfillError(f"{data} holds a mix of {built:,} examples, this recipe asks for {recipe.finetune_examples:,}; "
                               "use another --out for it")
    else:
        log(f"building the finetune mix ({recipe.finetune})")
        docs = [Document.from_dict({**json.loads(line), "text": json.loads(line)["content"]})
                for line in (out / "corpus-train.jsonl").read_text(encoding="utf-8").splitlines()]
        docs = [d for d in docs if reject_reason(d, filters()) is None]
        tok = load_tokenizer(out / "tokenizer.json")
        mix = MixConfig(examples=recipe.finetune_examples, seed=recipe.seed, instruct_fraction=0.15 if recipe.finetune == "card" else 0.0)
        build_finetune_mix(docs, tok, out / "tokenizer.json", data, mix)


def stage_config(recipe: Recipe, stage: str, data: Path, run: Path, init_from: Path | None = None) -> TrainConfig:
    """A stage's training config: the recipe's schedule (warmup 6%, cosine to a tenth), optimizer and batch;
    a stage that starts from trained weights (a finetune, or pretraining continued from a base) takes
    the finetune's learning rate."""
    steps = recipe.finetune_steps if stage == "finetune" else recipe.pretraining_steps
    if stage == "pretrain" and recipe.base:
        init_from = Path(recipe.base)
    lr = LEARNING_RATES[recipe.optimizer][stage == "finetune" or init_from is not None]
    return TrainConfig(
        data=str(data), out_dir=str(run), preset="tiny", model=recipe.shape, seed=recipe.seed,
        init_from=str(init_from) if init_from else None, steps=steps, micro_batch=recipe.micro_batch, grad_accum=1,
        block_size=recipe.block_size, optimizer=recipe.optimizer, lr=lr, min_lr=lr / 10, betas=BETAS[recipe.optimizer],
        warmup_steps=max(10, round(0.06 * steps)), weight_decay=0.1,
        early_dropout=recipe.early_dropout if stage == "pretrain" else 0.0, early_dropout_fraction=0.1,
        eval_every=max(1, steps // 10), eval_batches=8, checkpoint_every=max(1, steps // 10),
    )  # fmt: skip


def run_folders(out: Path, recipe: Recipe, keyed: bool) -> tuple[Path, Path]:
    """(pretraining, finetune) run folders: out/pretrain and out/finetune for the embedded model;
    out/runs/<settings> when several recipes share a folder (the ablation)."""
    if not keyed:
        return out / "pretrain", out / "finetune"
    key = recipe.pretrain_key()
    return out / "runs" / key, out / "runs" / f"{key}-finetune-{recipe.finetune}-{recipe.finetune_steps}"


def chat_answer(model: GPTRefactForCausalLM, tok: Tokenizer, question: str, max_new_tokens: int = 160) -> str:
    prompt = chat_prompt(tok, [ChatMessage("system", "You are a programming assistant"), ChatMessage("user", question)])
    ids = generate(model, prompt, max_new_tokens, temperature=0.0, stop_ids={tok.eot_id, tok.empty_output_id})
    return tok.decode(ids)


def evaluate_model(out: Path, run: Path, recipe: Recipe, log: Log = print, model_dir: Path | None = None) -> dict:
    """One model's report on the held-out code (cached in its run folder's eval.json): the infill
    metrics, held-out loss, HumanEval pass@1 (greedy, n=1) in the fim and completion formats, and
    the chat answer to SORT_QUESTION. The model is the run's, or model_dir (a base model, with `run`
    a folder for its report)."""
    path = run / "eval.json"
    if path.exists():
        return json.loads(path.read_text())
    log(f"evaluating {run.name} on the held-out code")
    run.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(model_dir or RunFolder(run).model), load_tokenizer(out / "tokenizer.json")
    texts = corpus_texts(out, "heldout")
    report = asdict(evaluate_stopping(model, tok, held_out_examples(texts, per_kind=recipe.eval_per_kind, seed=recipe.seed)))
    report["held_out_loss"] = held_out_loss(model, held_out_blocks(tok, texts, recipe.block_size, blocks=64))
    for fmt in ("fim", "completion"):
        config = EvalConfig(fmt=fmt, n=1, temperature=0.0, max_new_tokens=recipe.humaneval_tokens, seed=recipe.seed)
        result = run_eval(model, tok, humaneval_tasks()[: recipe.humaneval_problems], config, run / f"humaneval-{fmt}", workers=os.cpu_count() or 1)
        report[f"humaneval_{fmt}"] = result["pass_at_k"]["pass@1"]
    report["chat_answer"] = chat_answer(model, tok, SORT_QUESTION)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return report


def run_recipe(out: Path, recipe: Recipe, until_step: int | None = None, keyed: bool = True, log: Log = print) -> dict | None:
    """Run or resume one recipe in `out` (corpus and data shared by every recipe there); the final
    model's report, or None when paused by until_step."""
    pre_run, fine_run = run_folders(out, recipe, keyed)
    prepare_pretraining(out, recipe, log)
    pretrain = stage_config(recipe, "pretrain", pretrain_data(out, recipe), pre_run)
    train(pretrain, until_step=until_step)
    if read_step(pre_run) < pretrain.steps:
        return None
    if recipe.finetune == "none":
        return evaluate_model(out, pre_run, recipe, log)
    prepare_finetuning(out, recipe, log)
    finetune = stage_config(recipe, "finetune", finetune_data(out, recipe), fine_run, init_from=RunFolder(pre_run).model)
    train(finetune, until_step=until_step)
    if read_step(fine_run) < finetune.steps:
        return None
    return evaluate_model(out, fine_run, recipe, log)


def export(out: Path, report: dict, recipe: Recipe = EMBEDDED) -> Path:
    """The shipped form: bf16 weights, tokenizer, loss curves and a model card, in out/model."""
    folder = out / "model"
    pre_run, fine_run = run_folders(out, recipe, keyed=False)
    pretrain, finetune = RunFolder(pre_run), RunFolder(fine_run)
    model = load_model(finetune.model, dtype="float32").to(torch.bfloat16)  # a plain bf16 checkpoint, not a packed one
    save_model(model, folder)
    shutil.copy(out / "tokenizer.json", folder / "tokenizer.json")
    shutil.copy(pretrain.loss_plot, folder / "loss-pretrain.png")
    shutil.copy(finetune.loss_plot, folder / "loss-finetune.png")
    pre = stage_config(recipe, "pretrain", pretrain_data(out, recipe), pre_run)
    fine = stage_config(recipe, "finetune", finetune_data(out, recipe), fine_run)
    card = model_card(out, model.num_parameters(), report, pre, fine, HELD_OUT, recipe.seed, base=Path(recipe.base) if recipe.base else None)
    write_text_atomic(folder / "MODEL_CARD.md", card)
    return folder


def embedded_recipe(out: Path, until_step: int | None = None, base: Path | None = None, log: Log = print,
                    recipe: Recipe | None = None) -> Path | None:
    """Run or resume every step of the shipped model (EMBEDDED, or CONTINUED from `base`; tests give a
    smaller recipe); with until_step, pause a training stage after that step."""
    if base is not None:  # a copy in the work folder: the run resumes, and its card names it, whatever happens to `base`
        kept = out / "base" / "model"
        if not (kept / "model.safetensors").exists():
            shutil.copytree(base, kept.with_name("model.partial"), dirs_exist_ok=True)
            kept.with_name("model.partial").rename(kept)
        elif base.resolve() != kept.resolve() and (kept / "model.safetensors").read_bytes() != (base / "model.safetensors").read_bytes():
            raise MidfillError(f"{out} continues another base than {base}; use a new --out for this one")
        base = kept
    recipe = recipe or (EMBEDDED if base is None else CONTINUED)
    recipe = replace(recipe, base=str(base) if base else None)
    prepare_pretraining(out, recipe, log)  # the base is measured on the held-out split it writes
    report = {"base": evaluate_model(out, out / "base", recipe, log, model_dir=base)} if base is not None else {}
    if run_recipe(out, recipe, until_step, keyed=False, log=log) is None:
        return None
    pre_run, fine_run = run_folders(out, recipe, keyed=False)
    report |= {"pretrain": evaluate_model(out, pre_run, recipe, log), "finetune": evaluate_model(out, fine_run, recipe, log)}
    return export(out, report, recipe)


def read_step(run: Path) -> int:
    return len(RunFolder(run).rows())  # a row per step
