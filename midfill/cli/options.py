"""Option groups: options that several commands share, declared once as a dataclass.

A command names a group as one parameter (`loading: ModelLoading`); `@options` puts the
group's fields into the command's signature as ordinary options, for typer and --help, and
hands the command one instance built from them. (No `from __future__ import annotations`
here: typer reads these field types as objects.)
"""

import dataclasses
import functools
import inspect
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from midfill.cli.common import (
    DeviceOpt,
    DtypeOpt,
    KOpt,
    LoraOpt,
    MaxTokensOpt,
    ModelOpt,
    QuantizeOpt,
    RepetitionOpt,
    SeedOpt,
    TemperatureOpt,
    TokenizerOpt,
    TopKOpt,
    TopPOpt,
    WorkersOpt,
)
from midfill.engine.sampling import SamplingParams


@dataclass
class ModelLoading:
    """Which model and tokenizer to load, and how."""

    model: ModelOpt = None
    tokenizer: TokenizerOpt = None
    dtype: DtypeOpt = "auto"
    device: DeviceOpt = "cpu"
    quantize: QuantizeOpt = None


@dataclass
class Sampling:
    """How to choose tokens (the CLI's defaults: greedy)."""

    temperature: TemperatureOpt = 0.0
    top_k: TopKOpt = 0
    top_p: TopPOpt = 1.0
    repetition_penalty: RepetitionOpt = 1.0
    seed: SeedOpt = None

    def params(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed)


@dataclass
class Adapter:
    lora: LoraOpt = None


@dataclass
class EvalRun:
    """Where a benchmark writes, how many samples it draws and how it runs them."""

    out: Annotated[Path, typer.Option(help="Folder for samples, executions and results (reruns resume).")]
    seed: Annotated[int, typer.Option(help="Seed for sampling (and for infilling's random spans).")] = 0
    n: Annotated[int, typer.Option("--n", min=1, help="Samples per problem.")] = 1
    k: KOpt = "1"
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N tasks (a quick run).")] = None
    workers: WorkersOpt = max(1, os.cpu_count() or 1)
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Sampling temperature (the card: 0.2 for pass@1, 0.8 for pass@10).")
    ] = 0.2
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens per sample.")] = 384


GROUPS = (ModelLoading, Sampling, Adapter, EvalRun)
__all__ = ["Adapter", "EvalRun", "MaxTokensOpt", "ModelLoading", "Sampling", "options"]


def options(command=None, **defaults):
    """Expand the command's option-group parameters into options, and rebuild the groups on call.

    `@options(temperature=0.0)` also sets that group field's default for this command.
    """
    if command is None:
        return lambda command: options(command, **defaults)
    signature = inspect.signature(command)
    hints = typing.get_type_hints(command, include_extras=True)  # objects, not postponed strings
    groups = {name: hints[name] for name in signature.parameters if hints.get(name) in GROUPS}
    params, annotations = [], {}
    for name, param in signature.parameters.items():
        if name not in groups:
            params.append(param.replace(annotation=hints.get(name, param.annotation), kind=inspect.Parameter.KEYWORD_ONLY))
            annotations[name] = hints.get(name, param.annotation)
            continue
        for field in dataclasses.fields(groups[name]):
            default = defaults.get(field.name, inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default)
            params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=field.type))
            annotations[field.name] = field.type

    @functools.wraps(command)
    def wrapper(**kwargs):
        for name, cls in groups.items():
            kwargs[name] = cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls)})
        return command(**kwargs)

    wrapper.__signature__ = signature.replace(parameters=params, return_annotation=None)
    wrapper.__annotations__ = annotations
    return wrapper
