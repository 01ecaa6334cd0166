"""Commands that run a model: complete, chat, serve, info."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from midfill.cli.common import (
    CtxOpt,
    MaxTokensOpt,
    ModelOpt,
    app,
    err,
    load,
    model_or_default,
    one_of,
    out,
    user_errors,
)  # fmt: skip
from midfill.cli.options import Adapter, ModelLoading, Sampling, options
from midfill.engine import StopRules, TextAssembler, cursor_indent, stream_text
from midfill.errors import MidfillError
from midfill.files import write_bytes_atomic
from midfill.model import GPTRefactForCausalLM
from midfill.model.checkpoint import load_model, save_model
from midfill.model.precision import describe
from midfill.prompts import FIM_ORDERS, ChatMessage, chat_prompt, fim_prompt
from midfill.tokenizer import load_tokenizer
from midfill.train.run_folder import RunFolder


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
@options
def complete(
    *,
    loading: ModelLoading,
    prefix: Annotated[str, typer.Option(help="Code before the cursor.")] = "",
    suffix: Annotated[str, typer.Option(help="Code after the cursor.")] = "",
    file: Annotated[Optional[Path], typer.Option(help="Complete inside this file, at --line/--column.")] = None,
    line: Annotated[int, typer.Option(help="1-based cursor line in --file.")] = 1,
    column: Annotated[int, typer.Option(help="1-based cursor column in --file.")] = 1,
    mode: Annotated[str, typer.Option(help="single-line, multi-line or free.")] = "multi-line",
    order: Annotated[str, typer.Option(help="FIM prompt order: spm (Refact's IDE) or psm (model card).")] = "spm",
    max_tokens: MaxTokensOpt = 128,
    sampling: Sampling,
    ctx: CtxOpt = None,
    adapter: Adapter,
) -> None:
    """Fill in the middle at a cursor and stream the completion to the terminal."""
    one_of("--order", order, FIM_ORDERS)
    if file is not None:
        prefix, suffix = cursor_split(file, line, column)
    rules = StopRules.for_mode(mode, cursor_indent(prefix))
    net, tok = load(loading, adapter.lora)
    budget = prompt_budget(net, ctx, max_tokens)
    prompt = fim_prompt(tok, prefix, suffix, order=order, budget=budget)
    assembler = TextAssembler(tok, rules)
    started = time.perf_counter()
    print_stream(stream_text(net, prompt, assembler, max_tokens, sampling.params(), stop_ids={tok.eot_id}))
    report(assembler, len(prompt), started)


def prompt_budget(net: GPTRefactForCausalLM, ctx: int | None, max_tokens: int) -> int:
    context = min(ctx or net.config.n_positions, net.config.n_positions)
    budget = context - max_tokens
    if budget < 8:
        raise MidfillError(f"--max-tokens {max_tokens} leaves no room for a prompt in a {context}-token context")
    return budget


@app.command()
@user_errors
@options
def chat(
    *,
    loading: ModelLoading,
    message: Annotated[Optional[str], typer.Option(help="Ask one question and exit.")] = None,
    system: Annotated[str, typer.Option(help="System message.")] = "You are a programming assistant",
    max_tokens: MaxTokensOpt = 512,
    sampling: Sampling,
    ctx: CtxOpt = None,
    adapter: Adapter,
) -> None:
    """Chat with the model: one-shot with --message, otherwise interactively (Ctrl-D or 'exit' ends)."""
    net, tok = load(loading, adapter.lora)
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
        deltas = stream_text(net, prompt, assembler, max_tokens, sampling.params(), stop_ids={tok.eot_id, tok.empty_output_id})
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
@options
def serve(
    *,
    loading: ModelLoading,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8008,
    allowed_host: Annotated[
        Optional[list[str]],
        typer.Option(help="A name clients may reach this server by, besides loopback names, IPs and --host "
                     "(repeatable; '*' for any). Other Host headers get 403: a guard against DNS rebinding."),
    ] = None,
    api_key: Annotated[
        Optional[str], typer.Option(envvar="MIDFILL_API_KEY", help="Require this key (Authorization: Bearer).")
    ] = None,
    token_healing: Annotated[
        bool, typer.Option(help="Heal FIM prompts that end inside a token (mid-word, or a bare newline before indentation).")
    ] = True,
    suffix_overlap: Annotated[
        bool, typer.Option(help="Cut a FIM answer's end where it repeats the start of the text after the cursor.")
    ] = True,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Longest answer for a request that does not say (it may ask for more, or -1).")
    ] = 512,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together.")] = 8,
    max_queue: Annotated[int, typer.Option(min=0, help="Waiting requests beyond which 503 is answered.")] = 64,
    ctx: CtxOpt = None,
    prefix_cache_mb: Annotated[float, typer.Option(min=0, help="Memory for reusable prompt KV.")] = 512.0,
    speculate: Annotated[
        bool, typer.Option(help="Verify prompt-lookup drafts where they pay (same output; requests can opt out).")
    ] = True,
    fim_order: Annotated[str, typer.Option(help="FIM order for prompts built here: spm or psm.")] = "spm",
    name: Annotated[Optional[str], typer.Option(help="Model name clients see (default: the folder's).")] = None,
    finetune_run: Annotated[
        Optional[Path], typer.Option(help="A `midfill finetune --out` folder whose progress the web page shows.")
    ] = None,
    adapter: Adapter,
) -> None:
    """Serve completions and chat over HTTP: OpenAI, Refact and llama.cpp protocols."""
    import uvicorn  # the server stack is imported only when serving: it slows every other command

    from midfill.engine.scheduler import Engine
    from midfill.server.app import create_app
    from midfill.server.listener import server_config
    from midfill.server.state import ServerSettings

    one_of("--fim-order", fim_order, FIM_ORDERS)
    net, tok = load(loading, adapter.lora)
    engine = Engine(net, tok, max_batch=max_batch, max_queue=max_queue, ctx=ctx, prefix_cache_mb=prefix_cache_mb,
                    speculate=speculate)
    default_name = "midfill-embedded" if loading.model is None else Path(loading.model).name
    lora = adapter.lora
    if finetune_run is None and lora is not None and RunFolder(Path(lora).parent).progress.is_file():
        finetune_run = Path(lora).parent  # the run that made the adapter
    settings = ServerSettings(model_name=name or default_name, api_key=api_key or None, fim_order=fim_order,
                              finetune_run=str(finetune_run) if finetune_run else None, host=host,
                              allowed_hosts=tuple(allowed_host or ()), token_healing=token_healing,
                              cut_suffix_overlap=suffix_overlap, max_new_tokens=max_tokens)  # fmt: skip
    err.print(
        f"midfill: serving {settings.model_name} ({net.num_parameters():,} parameters, "
        f"weights {net.weight_format or net.dtype}, {net.device}, "
        f"context {engine.ctx}) at http://{host}:{port} (web page at /)" + (" with an API key" if api_key else "")
    )
    path = describe(net)
    err.print(f"midfill: {path['why']}; decode: {path['decode']}; prefill: {path['prefill']}")
    logging.basicConfig(level=logging.INFO, format="midfill: %(message)s")
    uvicorn.Server(server_config(create_app(engine, tok, settings), host, port)).run()


@app.command()
@user_errors
@options
def info(loading: ModelLoading) -> None:
    """Show a model's parameters, dtype, configuration and tokenizer."""
    model = model_or_default(loading.model)
    with err.status(f"loading {model} ..."):
        net = load_model(model, dtype=loading.dtype, device=loading.device, quantize=loading.quantize)
    table = Table(title=f"model {net.source}", show_header=False)
    table.add_row("parameters", f"{net.num_parameters():,}")
    table.add_row("device", str(net.device))
    for key, value in describe(net).items():
        table.add_row(key, value)
    table.add_row("MLP hidden size", str(net.config.mlp_hidden))
    for key, value in net.config.to_dict().items():
        table.add_row(key, str(value))
    out.print(table)
    try:
        tok = load_tokenizer(loading.tokenizer if loading.tokenizer is not None else net.source)
    except MidfillError as exc:
        out.print(f"tokenizer: none ({exc})")
        return
    specials = ", ".join(f"{name}={getattr(tok, name)}" for name in
                         ("eot_id", "fim_prefix_id", "fim_middle_id", "fim_suffix_id", "empty_output_id"))
    out.print(f"tokenizer: {tok.source}, {tok.vocab_size} tokens; {specials}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer_files(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            write_bytes_atomic(target / name, (source / name).read_bytes())


@app.command()
@user_errors
def quantize(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the packed checkpoint.")],
    weights: Annotated[str, typer.Option("--format", help="bf16, int8 or int4.")] = "int8",
    model: ModelOpt = None,
) -> None:
    """Pack a float checkpoint's linear weights once and save it; complete/chat/serve then load it packed."""
    source = model_or_default(model)
    with err.status(f"packing {source} as {weights} ..."):
        net = load_model(source, quantize=weights)
        save_model(net, out_dir)
    copy_tokenizer_files(Path(net.source), out_dir)
    size = (out_dir / "model.safetensors").stat().st_size
    out.print(f"{out_dir}: {weights} checkpoint, {size / 2**20:.1f} MiB ({net.num_parameters():,} parameters)")
