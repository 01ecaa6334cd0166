"""`midfill recipe embedded`: the whole pipeline that makes the model shipped inside midfill.

Data: the code `pip install -e .` puts on every machine (midfill.data.installed): the Python standard
library's sources and test suites (PSF licence) and the permissively licensed packages of midfill's
dependency closure, minus what is held out for evaluation (the HELD_OUT modules, their tests, which
would show the model the held-out code's behaviour, and HELD_OUT_PACKAGES) and minus the packages
the evaluations read. Steps, each skipped when its output exists and each resumable: corpus ->
tokenizer -> data build -> pretraining -> finetune mix (85% synthetic FIM, 15% instructions) ->
finetune -> evaluation before and after -> a bf16 export. Everything is seeded; rerunning the
command continues where it stopped.
"""

from __future__ import annotations

import json
import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from midfill.data.build import BuildConfig, build_dataset
from midfill.data.documents import Document
from midfill.data.filters import FilterConfig, reject_reason
from midfill.data.finetune_mix import MixConfig, build_finetune_mix
from midfill.data.installed import HELD_OUT, PERMISSIVE, Package, installed_packages, write_installed_corpus
from midfill.eval.stopping import evaluate_stopping, held_out_examples
from midfill.files import write_text_atomic
from midfill.model.checkpoint import load_model, save_model
from midfill.model_card import model_card
from midfill.tokenizer import load_tokenizer, train_tokenizer
from midfill.train.config import TrainConfig
from midfill.train.run_folder import RunFolder
from midfill.train.trainer import train

VOCAB_SIZE = 8192
SHAPE = dict(n_embd=384, n_layer=8, n_head=6, n_positions=1024)
SEED = 1234


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


def pretrain_config(out: Path) -> TrainConfig:
    return TrainConfig(
        data=str(out / "pretrain-data"), out_dir=str(out / "pretrain"), preset="tiny", model=SHAPE, seed=SEED,
        steps=2500, micro_batch=32, grad_accum=1, block_size=512, optimizer="lion", lr=6e-4, min_lr=6e-5,
        warmup_steps=150, weight_decay=0.1, early_dropout=0.1, early_dropout_fraction=0.1, eval_every=250,
        eval_batches=8, checkpoint_every=250,
    )


def prepare_pretraining(out: Path, log: Callable[[str], None] = print) -> TrainConfig:
    """Corpus, tokenizer and token shards for pretraining (each step skipped once done)."""
    out.mkdir(parents=True, exist_ok=True)
    write_corpus(out)
    train_corpus = out / "corpus-train.jsonl"
    tokenizer_path = out / "tokenizer.json"
    if not tokenizer_path.exists():
        log("training the tokenizer")
        texts = (json.loads(line)["content"] for line in train_corpus.read_text(encoding="utf-8").splitlines())
        train_tokenizer(texts, VOCAB_SIZE).save(tokenizer_path)
    if not (out / "pretrain-data" / "manifest.json").exists():
        log("building the pretraining data")
        build_dataset([str(train_corpus)], out / "pretrain-data", tokenizer_path, BuildConfig(filters(), val_fraction=0.02))
    load_tokenizer(tokenizer_path)
    return pretrain_config(out)


def finetune_config(out: Path) -> TrainConfig:
    return TrainConfig(
        data=str(out / "finetune-data"), out_dir=str(out / "finetune"), preset="tiny", model=SHAPE, seed=SEED,
        init_from=str(out / "pretrain" / "model"), steps=600, micro_batch=32, grad_accum=1, block_size=512,
        optimizer="lion", lr=2e-4, min_lr=2e-5, warmup_steps=40, weight_decay=0.1, early_dropout=0.0,
        eval_every=100, eval_batches=8, checkpoint_every=100,
    )


def prepare_finetuning(out: Path, log: Callable[[str], None] = print) -> TrainConfig:
    """The finetune mix (85% synthetic FIM, 15% instructions) from the training modules."""
    if not (out / "finetune-data" / "manifest.json").exists():
        log("building the finetune mix")
        docs = [Document.from_dict({**json.loads(line), "text": json.loads(line)["content"]})
                for line in (out / "corpus-train.jsonl").read_text(encoding="utf-8").splitlines()]
        docs = [d for d in docs if reject_reason(d, filters()) is None]
        tok = load_tokenizer(out / "tokenizer.json")
        build_finetune_mix(docs, tok, out / "tokenizer.json", out / "finetune-data", MixConfig(examples=20000, seed=SEED))
    return finetune_config(out)


def evaluate(out: Path, log: Callable[[str], None] = print) -> dict:
    """Stopping metrics on the held-out modules, before and after the finetune (cached in eval.json)."""
    path = out / "eval.json"
    if path.exists():
        return json.loads(path.read_text())
    texts = [json.loads(line)["content"] for line in (out / "corpus-heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    examples = held_out_examples(texts, per_kind=100, seed=SEED)
    tok = load_tokenizer(out / "tokenizer.json")
    report = {}
    for name in ("pretrain", "finetune"):
        log(f"evaluating the {name} model on the held-out modules")
        report[name] = asdict(evaluate_stopping(load_model(RunFolder(out / name).model), tok, examples))
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return report


def export(out: Path, report: dict) -> Path:
    """The shipped form: bf16 weights, tokenizer, loss curves and a model card, in out/model."""
    folder = out / "model"
    pretrain, finetune = RunFolder(out / "pretrain"), RunFolder(out / "finetune")
    model = load_model(finetune.model, dtype="bfloat16")
    save_model(model, folder)
    shutil.copy(out / "tokenizer.json", folder / "tokenizer.json")
    shutil.copy(pretrain.loss_plot, folder / "loss-pretrain.png")
    shutil.copy(finetune.loss_plot, folder / "loss-finetune.png")
    card = model_card(out, model.num_parameters(), report, pretrain_config(out), finetune_config(out), HELD_OUT, SEED)
    write_text_atomic(folder / "MODEL_CARD.md", card)
    return folder


def embedded_recipe(out: Path, until_step: int | None = None, log: Callable[[str], None] = print) -> Path | None:
    """Run or resume every step; with until_step, pause pretraining or finetuning after that step."""
    pretrain = prepare_pretraining(out, log)
    train(pretrain, until_step=until_step)
    if not RunFolder(pretrain.out_dir).model.exists() or read_step(pretrain.out_dir) < pretrain.steps:
        return None
    finetune = prepare_finetuning(out, log)
    train(finetune, until_step=until_step)
    if read_step(finetune.out_dir) < finetune.steps:
        return None
    return export(out, evaluate(out, log))


def read_step(run: str) -> int:
    return len(RunFolder(run).rows())  # a row per step
