"""What every `midfill` command shares: the app, consoles, option types, error handling, model loading."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console

from midfill.errors import MidfillError
from midfill.hub import EMBEDDED_MODEL
from midfill.model import GPTRefactForCausalLM
from midfill.model.checkpoint import load_model
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
DtypeOpt = Annotated[
    str,
    typer.Option(help="auto (the checkpoint's own; bf16 runs packed on a CPU), float32 (exact), bfloat16 or float16."),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
QuantizeOpt = Annotated[
    Optional[str],
    typer.Option(help="Pack the linear weights as bf16, int8 or int4 (CPU decode reads fewer bytes per token)."),
]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=0, help="Most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="0 = greedy.")]
TopKOpt = Annotated[int, typer.Option(min=0, help="Sample from the k most likely tokens (0 = all).")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")]
RepetitionOpt = Annotated[float, typer.Option(help=">1 discourages repeating context tokens.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")]
LoraOpt = Annotated[Optional[str], typer.Option(help="LoRA adapter folder from `midfill finetune`, folded in at load.")]
KOpt = Annotated[str, typer.Option("--k", help="Comma-separated k values for pass@k.")]
WorkersOpt = Annotated[int, typer.Option(min=1, help="Sandbox worker processes.")]
SourcesArg = Annotated[list[str], typer.Argument(help="Folders, git repositories or .jsonl/.parquet shards.")]
TokenizerFileOpt = Annotated[Path, typer.Option(help="tokenizer.json to tokenize with.")]
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


def one_of(flag: str, value: str, choices) -> str:
    """`value` if it is one of `choices`, else a one-line error naming the flag and the choices."""
    if value not in choices:
        raise MidfillError(f"unknown {flag} {value!r}; use one of {', '.join(choices)}")
    return value


def model_or_default(model: str | None) -> str:
    """The --model given, or the embedded model that ships with midfill."""
    if model is not None:
        return model
    if not (EMBEDDED_MODEL / "model.safetensors").is_file():
        raise MidfillError("no --model given and this install has no embedded model; pass a model folder or hub id")
    return str(EMBEDDED_MODEL)


def load(loading, lora: str | None = None) -> tuple[GPTRefactForCausalLM, Tokenizer]:
    """The model (with a LoRA adapter folded in, then packed, when asked) and its tokenizer, as
    `loading` (cli/options.ModelLoading) says."""
    model, tokenizer, dtype, device, quantize = (loading.model, loading.tokenizer, loading.dtype, loading.device,
                                                 loading.quantize)
    from midfill.model.checkpoint import stored_dtype
    from midfill.model.lora import load_adapter, merge_lora
    from midfill.model.precision import apply_precision, choose_precision

    model = model_or_default(model)
    with err.status(f"loading {model} ..."):
        if lora is None:
            net = load_model(model, dtype=dtype, device=device, quantize=quantize)
        else:  # the adapter folds into float32 weights, which then take the precision asked for
            net = load_model(model, dtype="float32", device=device)
            if net.weight_format is not None:
                raise MidfillError(f"{model} is packed ({net.weight_format}); a LoRA adapter folds into a float checkpoint")
            load_adapter(net, lora)
            merge_lora(net)
            apply_precision(net, choose_precision(stored_dtype(model), dtype, quantize, net.device))
        tok = load_tokenizer(tokenizer if tokenizer is not None else net.source)
    if tok.vocab_size > net.config.vocab_size:
        raise MidfillError(
            f"{tok.source}: the tokenizer has {tok.vocab_size} tokens but the model only {net.config.vocab_size}; "
            "pass the tokenizer that belongs to this model with --tokenizer"
        )
    return net, tok
