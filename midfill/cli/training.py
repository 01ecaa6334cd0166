"""Commands that make models: tokenizer train, data build, data fim-synth, train, recipe."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress, TextColumn
from rich.table import Table

from midfill.cli.common import SourcesArg, TokenizerFileOpt, app, err, user_errors
from midfill.errors import MidfillError
from midfill.hub import EMBEDDED_MODEL
from midfill.tokenizer import load_tokenizer

tokenizer_app = typer.Typer(help="Tokenizers: train a Refact-style BPE.", no_args_is_help=True)
data_app = typer.Typer(help="Training data: build token shards from code.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")


@tokenizer_app.command("train")
@user_errors
def tokenizer_train(
    sources: SourcesArg,
    out: Annotated[Path, typer.Option(help="Where to write tokenizer.json.")] = Path("tokenizer.json"),
    vocab_size: Annotated[int, typer.Option(min=275, help="Tokens, special ones included.")] = 16384,
    max_documents: Annotated[int, typer.Option(min=1, help="Train on at most this many filtered files.")] = 100_000,
) -> None:
    """Train a byte-level BPE (digits split, Refact's special tokens at ids 0..18) on filtered code."""
    from midfill.data.filters import FilterConfig, reject_reason
    from midfill.data.sources import iter_source
    from midfill.tokenizer import train_tokenizer

    config = FilterConfig(natural_language_text=False)
    counted = {"read": 0, "used": 0}

    def texts():
        with err.status("reading and filtering sources ...") as status:
            for source in sources:
                for doc in iter_source(source):
                    counted["read"] += 1
                    if reject_reason(doc, config) is None:
                        counted["used"] += 1
                        status.update(f"training on {counted['used']} files ...")
                        yield doc.text
                        if counted["used"] >= max_documents:
                            return

    tok = train_tokenizer(texts(), vocab_size)
    tok.save(out)
    err.print(f"{out}: {tok.vocab_size} tokens, trained on {counted['used']} of {counted['read']} files "
              f"(model vocab_size padded to {64 * -(-tok.vocab_size // 64)})")


@data_app.command("build")
@user_errors
def data_build(
    sources: SourcesArg,
    out: Annotated[Path, typer.Option(help="Build folder (resumes if it has a partial build).")],
    tokenizer: TokenizerFileOpt,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = max(1, os.cpu_count() or 1),
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="Share of documents held out.")] = 0.01,
    languages: Annotated[Optional[str], typer.Option(help="Comma-separated languages to keep (default: all known).")] = None,
    redis: Annotated[Optional[str], typer.Option(help="HOST:PORT of a Redis to hold the MinHash LSH index.")] = None,
) -> None:
    """Filter, deduplicate (exact + MinHash), tokenize and pack sources into token shards."""
    from midfill.data.build import BuildConfig, build_dataset
    from midfill.data.filters import FilterConfig

    redis_address = None
    if redis is not None:
        host, _, port = redis.rpartition(":")
        if not host or not port.isdigit():
            raise MidfillError(f"--redis {redis!r}: expected HOST:PORT")
        redis_address = (host, int(port))
    filters = FilterConfig(languages=set(languages.split(",")) if languages else None)
    config = BuildConfig(filters=filters, val_fraction=val_fraction, workers=workers, redis=redis_address)
    with Progress(TextColumn("{task.description}"), TextColumn("{task.completed} documents"), console=err) as progress:
        tasks = {stage: progress.add_task(stage, total=None) for stage in ("filter", "dedup", "pack")}
        manifest = build_dataset(sources, out, tokenizer, config, lambda stage, n: progress.advance(tasks[stage], n))
    table = Table(title=f"data build: {out}")
    for column in ("stage", "docs in", "docs out", "bytes in", "bytes out", "notes"):
        table.add_column(column)
    stages = manifest["stages"]
    f, d = stages["filter"], stages["dedup"]
    table.add_row("filter", f"{f['docs_in']:,}", f"{f['docs_out']:,}", f"{f['bytes_in']:,}", f"{f['bytes_out']:,}",
                  ", ".join(f"{k}: {v}" for k, v in sorted(f["rejected"].items())))
    table.add_row("dedup", f"{d['docs_in']:,}", f"{d['docs_out']:,}", f"{d['bytes_in']:,}", f"{d['bytes_out']:,}",
                  f"exact: {d['exact_duplicates']}, near: {d['near_duplicates']}")
    tokens = {split: sum(s["tokens"] for s in shards) for split, shards in manifest["splits"].items()}
    table.add_row("pack", f"{d['docs_out']:,}", "", "", "", f"train {tokens['train']:,} tokens, val {tokens['val']:,} tokens")
    out_console = Console(highlight=False, width=160)
    out_console.print(table)


@data_app.command("fim-synth")
@user_errors
def data_fim_synth(
    sources: SourcesArg,
    out: Annotated[Path, typer.Option(help="Folder for the example shards.")],
    tokenizer: TokenizerFileOpt,
    examples: Annotated[int, typer.Option(min=1, help="Examples in all.")] = 20000,
    instruct_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of instruction (chat) examples.")] = 0.15,
    mix: Annotated[str, typer.Option(help="Synthetic FIM kinds and weights.")] = "empty=0.1,line=0.15,rest-of-line=0.2,mid-identifier=0.15,line-start=0.1,multi=0.3",
    seed: Annotated[int, typer.Option(help="Seed for the cuts and the shuffle.")] = 0,
) -> None:
    """Build the finetune mix: synthetic FIM that teaches stopping, plus instruction pairs from code."""
    from midfill.data.filters import FilterConfig, reject_reason
    from midfill.data.fim_synth import CUTTERS, SynthConfig
    from midfill.data.finetune_mix import MixConfig, build_finetune_mix
    from midfill.data.sources import iter_source

    kinds = {}
    for item in mix.split(","):
        name, _, weight = item.partition("=")
        if name not in CUTTERS or not weight.replace(".", "", 1).isdigit():
            raise MidfillError(f"--mix {item!r}: expected KIND=WEIGHT with KIND one of {', '.join(CUTTERS)}")
        kinds[name] = float(weight)
    tok = load_tokenizer(tokenizer)
    filters = FilterConfig(natural_language_text=False)
    with err.status("reading sources ..."):
        docs = [d for source in sources for d in iter_source(source) if reject_reason(d, filters) is None]
    config = MixConfig(examples=examples, instruct_fraction=instruct_fraction, seed=seed, synth=SynthConfig(kinds=kinds))
    with err.status(f"cutting {examples:,} examples from {len(docs):,} files ..."):
        manifest = build_finetune_mix(docs, tok, tokenizer, out, config)
    tokens = sum(s["tokens"] for s in manifest["splits"]["train"])
    out_console = Console(highlight=False)
    out_console.print(f"{out}: {tokens:,} training tokens; examples: "
                      + ", ".join(f"{k} {v:,}" for k, v in sorted(manifest["examples_per_kind"].items())))


recipe_app = typer.Typer(help="Recipes: whole pipelines in one command.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("embedded")
@user_errors
def recipe_embedded(
    out: Annotated[Path, typer.Option(help="Work folder; rerun with the same folder to resume.")],
    until_step: Annotated[Optional[int], typer.Option(min=1, help="Pause each training stage after this step.")] = None,
    install: Annotated[bool, typer.Option(help="Copy the result into this package's assets.")] = False,
    continue_from: Annotated[Optional[Path], typer.Option(help="A model folder to continue (its tokenizer and weights) instead of a new network.")] = None,
) -> None:
    """Reproduce the embedded model: corpus of installed code, tokenizer, pretraining, finetune mix, finetune, eval."""

    from midfill.recipe import embedded_recipe

    if continue_from is not None and not (continue_from / "model.safetensors").is_file():
        raise MidfillError(f"--continue-from {continue_from}: no model.safetensors there")
    folder = embedded_recipe(out, until_step=until_step, base=continue_from, log=lambda message: err.print(f"recipe: {message}"))
    if folder is None:
        err.print(f"recipe: paused; rerun the same command to continue ({out})")
        return
    err.print(f"recipe: model written to {folder}")
    if install:
        shutil.copytree(folder, EMBEDDED_MODEL, dirs_exist_ok=True)
        err.print(f"recipe: installed into {EMBEDDED_MODEL}")


@app.command("train")
@user_errors
def train_command(
    config: Annotated[Path, typer.Option("--config", help="TOML or YAML training config.")],
    until_step: Annotated[Optional[int], typer.Option(min=1, help="Stop (checkpointed) after this step; rerun to continue.")] = None,
) -> None:
    """Train or resume a model (run under torchrun for several processes)."""
    from midfill.train.config import load_config
    from midfill.train.trainer import train

    folder = train(load_config(config), until_step=until_step)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process reports
        err.print(f"model written to {folder}")
