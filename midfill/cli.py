"""The `midfill` command: thin wrappers that turn options into calls to the packages below."""

from __future__ import annotations

import functools
import os
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress, TextColumn
from rich.table import Table

from midfill.engine import SamplingParams, StopRules, TextAssembler, cursor_indent, stream_text
from midfill.errors import MidfillError
from midfill.hub import EMBEDDED_MODEL
from midfill.model import GPTRefactForCausalLM
from midfill.model.checkpoint import load_model
from midfill.prompts import FIM_ORDERS, ChatMessage, chat_prompt, fim_prompt
from midfill.tokenizer import Tokenizer, load_tokenizer

app = typer.Typer(help="Self-hosted fill-in-the-middle code completion and chat.", no_args_is_help=True)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

F = TypeVar("F", bound=Callable[..., None])

ModelOpt = Annotated[
    Optional[str], typer.Option("--model", "-m", help="Model folder or hub id (owner/name); default: the embedded model.")
]
TokenizerOpt = Annotated[
    Optional[str], typer.Option(help="tokenizer.json file or folder; default: the model's own.")
]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=0, help="Most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="0 = greedy.")]
TopKOpt = Annotated[int, typer.Option(min=0, help="Sample from the k most likely tokens (0 = all).")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")]
RepetitionOpt = Annotated[float, typer.Option(help=">1 discourages repeating context tokens.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")]
CtxOpt = Annotated[Optional[int], typer.Option(min=16, help="Context size in tokens (default: the model's).")]


def user_errors(command: F) -> F:
    """Report a MidfillError as one line on stderr with exit code 2, never as a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MidfillError as exc:
            err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def model_or_default(model: str | None) -> str:
    """The --model given, or the embedded model that ships with midfill."""
    if model is not None:
        return model
    if not (EMBEDDED_MODEL / "model.safetensors").is_file():
        raise MidfillError("no --model given and this install has no embedded model; pass a model folder or hub id")
    return str(EMBEDDED_MODEL)


def load(model: str | None, tokenizer: str | None, dtype: str, device: str) -> tuple[GPTRefactForCausalLM, Tokenizer]:
    model = model_or_default(model)
    with err.status(f"loading {model} ..."):
        net = load_model(model, dtype=dtype, device=device)
        tok = load_tokenizer(tokenizer if tokenizer is not None else net.source)
    if tok.vocab_size > net.config.vocab_size:
        raise MidfillError(
            f"{tok.source}: the tokenizer has {tok.vocab_size} tokens but the model only {net.config.vocab_size}; "
            "pass the tokenizer that belongs to this model with --tokenizer"
        )
    return net, tok


def cursor_split(path: Path, line: int, column: int) -> tuple[str, str]:
    """Prefix and suffix of a file at a 1-based line and column (as editors show them)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MidfillError(f"{path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as exc:
        raise MidfillError(f"{path}: cannot read it as UTF-8 text ({exc.__class__.__name__})") from None
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise MidfillError(f"--line {line} is outside {path}, which has lines 1..{len(lines)}")
    if not 1 <= column <= len(lines[line - 1]) + 1:
        raise MidfillError(f"--column {column} is outside line {line}, which has columns 1..{len(lines[line - 1]) + 1}")
    offset = sum(len(x) + 1 for x in lines[: line - 1]) + column - 1
    return text[:offset], text[offset:]


def print_stream(deltas: Iterator[str]) -> None:
    for delta in deltas:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def report(assembler: TextAssembler, n_prompt: int, started: float) -> None:
    seconds = time.perf_counter() - started
    n_new = len(assembler.token_ids)
    err.print(
        f"[dim]{n_prompt} prompt tokens, {n_new} generated in {seconds:.2f}s "
        f"({n_new / max(seconds, 1e-9):.1f} tok/s), finish: {assembler.finish_reason}[/]"
    )


@app.command()
@user_errors
def complete(
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    prefix: Annotated[str, typer.Option(help="Code before the cursor.")] = "",
    suffix: Annotated[str, typer.Option(help="Code after the cursor.")] = "",
    file: Annotated[Optional[Path], typer.Option(help="Complete inside this file, at --line/--column.")] = None,
    line: Annotated[int, typer.Option(help="1-based cursor line in --file.")] = 1,
    column: Annotated[int, typer.Option(help="1-based cursor column in --file.")] = 1,
    mode: Annotated[str, typer.Option(help="single-line, multi-line or free.")] = "multi-line",
    order: Annotated[str, typer.Option(help="FIM prompt order: spm (Refact's IDE) or psm (model card).")] = "spm",
    max_tokens: MaxTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    repetition_penalty: RepetitionOpt = 1.0,
    seed: SeedOpt = None,
    ctx: CtxOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Fill in the middle at a cursor and stream the completion to the terminal."""
    if order not in FIM_ORDERS:
        raise MidfillError(f"unknown --order {order!r}; use spm or psm")
    if file is not None:
        prefix, suffix = cursor_split(file, line, column)
    rules = StopRules.for_mode(mode, cursor_indent(prefix))
    sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
    net, tok = load(model, tokenizer, dtype, device)
    budget = prompt_budget(net, ctx, max_tokens)
    prompt = fim_prompt(tok, prefix, suffix, order=order, budget=budget)
    assembler = TextAssembler(tok, rules)
    started = time.perf_counter()
    print_stream(stream_text(net, prompt, assembler, max_tokens, sampling, stop_ids={tok.eot_id}))
    report(assembler, len(prompt), started)


def prompt_budget(net: GPTRefactForCausalLM, ctx: int | None, max_tokens: int) -> int:
    context = min(ctx or net.config.n_positions, net.config.n_positions)
    budget = context - max_tokens
    if budget < 8:
        raise MidfillError(f"--max-tokens {max_tokens} leaves no room for a prompt in a {context}-token context")
    return budget


@app.command()
@user_errors
def chat(
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    message: Annotated[Optional[str], typer.Option(help="Ask one question and exit.")] = None,
    system: Annotated[str, typer.Option(help="System message.")] = "You are a programming assistant",
    max_tokens: MaxTokensOpt = 512,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    repetition_penalty: RepetitionOpt = 1.0,
    seed: SeedOpt = None,
    ctx: CtxOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Chat with the model: one-shot with --message, otherwise interactively (Ctrl-D or 'exit' ends)."""
    sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
    net, tok = load(model, tokenizer, dtype, device)
    budget = prompt_budget(net, ctx, max_tokens)
    history = [ChatMessage("system", system)] if system else []
    while True:
        query = message if message is not None else ask()
        if query is None:
            return
        history.append(ChatMessage("user", query))
        prompt = chat_prompt(tok, history, budget=budget)
        assembler = TextAssembler(tok, StopRules(trim_trailing_whitespace=True))
        started = time.perf_counter()
        deltas = stream_text(net, prompt, assembler, max_tokens, sampling, stop_ids={tok.eot_id, tok.empty_output_id})
        print_stream(strip_leading_space(deltas))
        report(assembler, len(prompt), started)
        history.append(ChatMessage("assistant", assembler.text.strip()))
        if message is not None:
            return


def ask() -> str | None:
    """The next user message from the terminal, or None when the user is done."""
    while True:
        try:
            query = input("you> ").strip()
        except EOFError:
            return None
        if query in ("exit", "quit"):
            return None
        if query:
            return query


def strip_leading_space(deltas: Iterator[str]) -> Iterator[str]:
    """The model answers "ASSISTANT" with a space first; drop it from the shown text."""
    started = False
    for delta in deltas:
        if not started:
            delta = delta.lstrip()
            started = bool(delta)
        if delta:
            yield delta


@app.command()
@user_errors
def serve(
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8008,
    api_key: Annotated[
        Optional[str], typer.Option(envvar="MIDFILL_API_KEY", help="Require this key (Authorization: Bearer).")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together.")] = 8,
    max_queue: Annotated[int, typer.Option(min=0, help="Waiting requests beyond which 503 is answered.")] = 64,
    ctx: CtxOpt = None,
    prefix_cache_mb: Annotated[float, typer.Option(min=0, help="Memory for reusable prompt KV.")] = 512.0,
    fim_order: Annotated[str, typer.Option(help="FIM order for prompts built here: spm or psm.")] = "spm",
    name: Annotated[Optional[str], typer.Option(help="Model name clients see (default: the folder's).")] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Serve completions and chat over HTTP: OpenAI, Refact and llama.cpp protocols."""
    import uvicorn  # the server stack is imported only when serving: it slows every other command


    from midfill.engine.scheduler import Engine
    from midfill.server.app import create_app
    from midfill.server.state import ServerSettings

    if fim_order not in FIM_ORDERS:
        raise MidfillError(f"unknown --fim-order {fim_order!r}; use spm or psm")
    net, tok = load(model, tokenizer, dtype, device)
    engine = Engine(net, tok, max_batch=max_batch, max_queue=max_queue, ctx=ctx, prefix_cache_mb=prefix_cache_mb)
    default_name = "midfill-embedded" if model is None else Path(model).name
    settings = ServerSettings(model_name=name or default_name, api_key=api_key or None, fim_order=fim_order)
    err.print(
        f"midfill: serving {settings.model_name} ({net.num_parameters():,} parameters, {net.dtype}, {net.device}, "
        f"context {engine.ctx}) at http://{host}:{port}" + (" with an API key" if api_key else "")
    )
    logging.basicConfig(level=logging.INFO, format="midfill: %(message)s")
    uvicorn.run(create_app(engine, tok, settings), host=host, port=port, log_level="warning")


@app.command()
@user_errors
def info(
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Show a model's parameters, dtype, configuration and tokenizer."""
    model = model_or_default(model)
    with err.status(f"loading {model} ..."):
        net = load_model(model, dtype=dtype, device=device)
    table = Table(title=f"model {net.source}", show_header=False)
    table.add_row("parameters", f"{net.num_parameters():,}")
    table.add_row("dtype / device", f"{net.dtype} / {net.device}")
    table.add_row("MLP hidden size", str(net.config.mlp_hidden))
    for key, value in net.config.to_dict().items():
        table.add_row(key, str(value))
    out.print(table)
    try:
        tok = load_tokenizer(tokenizer if tokenizer is not None else net.source)
    except MidfillError as exc:
        out.print(f"tokenizer: none ({exc})")
        return
    specials = ", ".join(f"{name}={getattr(tok, name)}" for name in
                         ("eot_id", "fim_prefix_id", "fim_middle_id", "fim_suffix_id", "empty_output_id"))
    out.print(f"tokenizer: {tok.source}, {tok.vocab_size} tokens; {specials}")


tokenizer_app = typer.Typer(help="Tokenizers: train a Refact-style BPE.", no_args_is_help=True)
data_app = typer.Typer(help="Training data: build token shards from code.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")


@tokenizer_app.command("train")
@user_errors
def tokenizer_train(
    sources: Annotated[list[str], typer.Argument(help="Folders, git repositories or .jsonl/.parquet shards.")],
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
    sources: Annotated[list[str], typer.Argument(help="Folders, git repositories or .jsonl/.parquet shards.")],
    out: Annotated[Path, typer.Option(help="Build folder (resumes if it has a partial build).")],
    tokenizer: Annotated[Path, typer.Option(help="tokenizer.json to tokenize with.")],
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
    sources: Annotated[list[str], typer.Argument(help="Folders, git repositories or .jsonl/.parquet shards of code.")],
    out: Annotated[Path, typer.Option(help="Folder for the example shards.")],
    tokenizer: Annotated[Path, typer.Option(help="tokenizer.json to tokenize with.")],
    examples: Annotated[int, typer.Option(min=1, help="Examples in all.")] = 20000,
    instruct_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of instruction (chat) examples.")] = 0.15,
    mix: Annotated[str, typer.Option(help="Synthetic FIM kinds and weights.")] = "empty=0.1,single=0.45,multi=0.45",
    seed: Annotated[int, typer.Option(help="Seed for the cuts and the shuffle.")] = 0,
) -> None:
    """Build the finetune mix: synthetic FIM that teaches stopping, plus instruction pairs from code."""
    from midfill.data.filters import FilterConfig, reject_reason
    from midfill.data.fim_synth import DEFAULT_KINDS, SynthConfig
    from midfill.data.finetune_mix import MixConfig, build_finetune_mix
    from midfill.data.sources import iter_source

    kinds = {}
    for item in mix.split(","):
        name, _, weight = item.partition("=")
        if name not in DEFAULT_KINDS or not weight.replace(".", "", 1).isdigit():
            raise MidfillError(f"--mix {item!r}: expected KIND=WEIGHT with KIND one of {', '.join(DEFAULT_KINDS)}")
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
) -> None:
    """Reproduce the embedded model: stdlib corpus, tokenizer, pretraining, finetune mix, finetune, eval."""
    import shutil

    from midfill.recipe import embedded_recipe

    folder = embedded_recipe(out, until_step=until_step, log=lambda message: err.print(f"recipe: {message}"))
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


if __name__ == "__main__":
    app()
