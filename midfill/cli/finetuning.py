"""Commands that adapt a model to a team's code: finetune (LoRA) and lora merge."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from midfill.cli.common import DeviceOpt, ModelOpt, app, err, model_or_default, out, user_errors
from midfill.errors import MidfillError

lora_app = typer.Typer(help="LoRA adapters: fold one into a full checkpoint.", no_args_is_help=True)
app.add_typer(lora_app, name="lora")


def show_files(train: list, test: list, rejected: list) -> None:
    """The files chosen and the reasons for the others, as the user sees them before training."""
    table = Table(title="files", show_lines=False)
    table.add_column("verdict")
    table.add_column("files", justify="right")
    table.add_column("examples")
    table.add_row("train", str(len(train)), ", ".join(d.path for d in train[:3]) + (" ..." if len(train) > 3 else ""))
    table.add_row("test (held out)", str(len(test)), ", ".join(d.path for d in test))
    for reason, count in Counter(reason for _, reason in rejected).most_common():
        examples = [path for path, r in rejected if r == reason][:2]
        table.add_row(f"rejected: {reason}", str(count), ", ".join(examples))
    err.print(table)


@app.command()
@user_errors
def finetune(
    repos: Annotated[list[Path], typer.Argument(help="Repository folders (git-tracked files, or files not .gitignore'd).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints, adapter/, REPORT.md (reruns resume).")],
    model: ModelOpt = None,
    include: Annotated[Optional[list[str]], typer.Option(help="Only paths matching this glob (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Skip paths matching this glob (repeatable).")] = None,
    rank: Annotated[int, typer.Option("--r", min=1, help="LoRA rank.")] = 16,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale alpha/r).")] = 32.0,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (linear warmup, cosine decay).")] = 3e-4,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Passes over the data (default: scaled to its size).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many steps.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 4,
    block: Annotated[int, typer.Option(min=32, help="Tokens per example.")] = 512,
    eval_every: Annotated[int, typer.Option(min=1, help="Steps between test-loss checks (and checkpoints).")] = 25,
    patience: Annotated[int, typer.Option(min=1, help="Stop after this many test-loss checks without a new best.")] = 3,
    exact_match_examples: Annotated[int, typer.Option(min=1, help="Held-out examples per kind for the exact-match report.")] = 100,
    middle_only: Annotated[bool, typer.Option(help="FIM examples teach only their middle (default: every token).")] = False,
    test_files: Annotated[Optional[int], typer.Option(min=1, help="Files held out (default: ~10%, 1 to 5).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, FIM cuts and order.")] = 0,
    device: DeviceOpt = "cpu",
) -> None:
    """Finetune on your own repositories with LoRA; shows which files were used and why others were not."""
    from midfill.train.finetune import FinetuneConfig
    from midfill.train.finetune import finetune as run_finetune
    from midfill.train.run_folder import RunFolder
    from midfill.train.trainer import progress_bar

    config = FinetuneConfig(
        repos=[str(r) for r in repos], out=str(out_dir), model=model_or_default(model), include=include or [],
        exclude=exclude or [], r=rank, alpha=alpha, lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        block=block, eval_every=eval_every, patience=patience, middle_only_loss=middle_only,
        exact_match_examples=exact_match_examples, test_files=test_files, seed=seed, device=device,
    )  # fmt: skip
    with progress_bar("finetune", console=err) as progress:
        report = run_finetune(config, progress=progress, log=lambda m: err.print(f"midfill: {m}"), show_files=show_files)
    out.print(RunFolder(out_dir).report_md.read_text())
    out.print(f"adapter: {report['finetuned']['adapter']}  (serve it: midfill serve --model {config.model} --lora {report['finetuned']['adapter']})")


@lora_app.command("merge")
@user_errors
def lora_merge(
    lora: Annotated[Path, typer.Option(help="Adapter folder (adapter.safetensors, adapter_config.json).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the merged checkpoint.")],
    model: ModelOpt = None,
) -> None:
    """Fold a LoRA adapter into the base model's weights and save a full checkpoint."""
    from midfill.cli.inference import copy_tokenizer_files
    from midfill.model.checkpoint import load_model, save_model
    from midfill.model.lora import load_adapter, merge_lora

    source = model_or_default(model)
    with err.status(f"merging {lora} into {source} ..."):
        net = load_model(source, dtype="float32")
        if net.weight_format is not None:
            raise MidfillError(f"{source} is packed ({net.weight_format}); merge into the original float checkpoint")
        load_adapter(net, lora)
        save_model(merge_lora(net), out_dir)
        copy_tokenizer_files(Path(net.source), out_dir)
    out.print(f"{out_dir}: base model with {lora} folded in")
