"""The trusted half of a Python task: the task's own code and its `check`, run outside the sandbox.

A program that runs its own tests can fake their verdict (print the end marker, replace `check`
through a trace hook, swap AssertionError, exit 0 from an atexit handler...): no in-process
check is safe from code in the same process. So the candidate program runs in the sandbox and
only answers calls of its entry point (harness.py), while the judge runs the task's prompt (its
helper functions) and its `check` here, handing `check` a stand-in that forwards each call
through a pipe. Only plain data crosses, so an always-equal object cannot either.

What this does not guard against: a program that finds the expected answers on disk (the
benchmark's data is world-readable in site-packages) and returns them.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

from midfill.eval.harness import NotPlainData, from_plain, read_frame, to_plain, write_frame
from midfill.eval.sandbox import Sandbox, python_for
from midfill.eval.tasks import Task

HARNESS_SOURCE = Path(__file__).with_name("harness.py").read_text(encoding="utf-8")


class CandidateFailed(BaseException):
    """The candidate broke off, timed out or answered with something other than plain data.

    A BaseException, so that a `check` which catches Exception cannot swallow it; the run fails
    even if it is swallowed (the stand-in remembers).
    """

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class CandidateRaised(Exception):
    """The candidate's function raised; `check` may expect that, so it is an ordinary exception."""


class Candidate:
    """What `check` calls in place of the entry point: each call is answered by the sandboxed program."""

    def __init__(self, calls_fd: int, answers_fd: int, deadline: float) -> None:
        self.calls_fd, self.answers_fd = calls_fd, answers_fd
        self.deadline = deadline
        self.failure: CandidateFailed | None = None

    def fail(self, status: str, reason: str) -> CandidateFailed:
        self.failure = self.failure or CandidateFailed(status, reason)
        return self.failure

    def answer(self) -> list:
        if self.failure is not None:
            raise self.failure
        try:
            message = read_frame(self.answers_fd, self.deadline)
        except TimeoutError:
            raise self.fail("timeout", "the program did not answer in time") from None
        except (EOFError, OSError) as exc:
            raise self.fail("failed", f"the program ended without answering ({exc})") from None
        except NotPlainData as exc:
            raise self.fail("failed", f"the program's answer is not plain data ({exc})") from None
        if not isinstance(message, list) or not message or not isinstance(message[0], str):
            raise self.fail("failed", "the program's answer is not a message")
        return message

    def wait_until_loaded(self) -> None:
        message = self.answer()
        if message[0] != "ready":
            raise self.fail("failed", str(message[1]) if len(message) > 1 and message[0] == "broken" else "not ready")

    def __call__(self, *args, **kwargs):
        if self.failure is not None:
            raise self.failure
        try:
            write_frame(self.calls_fd, ["call", to_plain(list(args)), to_plain(dict(kwargs))], self.deadline)
        except TimeoutError:
            raise self.fail("timeout", "the program did not take its arguments in time") from None
        except (OSError, NotPlainData) as exc:
            raise self.fail("failed", f"could not pass the arguments ({exc})") from None
        message = self.answer()
        try:
            if message[0] == "ok" and len(message) == 2:
                return from_plain(message[1])
        except NotPlainData as exc:
            raise self.fail("failed", f"the return value is not plain data ({exc})") from None
        if message[0] == "raised" and len(message) == 3:
            raise CandidateRaised(f"{message[1]}: {message[2]}")
        raise self.fail("failed", f"the program answered {str(message[0])[:40]!r}: not a return value")


def judge_python(sandbox: Sandbox, task: Task, completion: str) -> tuple[str, str]:
    """(status, error) of a completion: "passed" only if the task's check ran to its end here."""
    calls_r, calls_w = os.pipe()
    answers_r, answers_w = os.pipe()
    program = task.prefix + completion + task.suffix
    command = [python_for(sandbox.uid), "-I", "harness.py", "main.py", task.entry_point, str(calls_r), str(answers_w)]
    try:
        with sandbox.started(command, {"main.py": program, "harness.py": HARNESS_SOURCE}, (calls_r, answers_w)) as run:
            os.close(calls_r)
            os.close(answers_w)
            calls_r = answers_w = -1
            os.set_blocking(calls_w, False)  # with a deadline on every write, a program that stops reading cannot hang us
            os.set_blocking(answers_r, False)
            candidate = Candidate(calls_w, answers_r, run.started + sandbox.limits.wall_seconds)
            try:
                candidate.wait_until_loaded()
                trusted = {"__name__": "judge"}
                exec(compile(task.header, f"{task.task_id}:prompt", "exec"), trusted)
                trusted[task.entry_point] = candidate  # some tests call the function by its name, as the program would
                exec(compile(task.test, f"{task.task_id}:test", "exec"), trusted)
                trusted["check"](candidate)
            except CandidateFailed:
                pass  # recorded on the stand-in
            except Exception as exc:  # the check failed: an assertion, or an error on the candidate's answer
                return "failed", "".join(traceback.format_exception_only(type(exc), exc))[-500:]
            if candidate.failure is not None:
                return candidate.failure.status, f"{candidate.failure}\n{run.tail(run.err)[-300:]}"
            return "passed", ""
    finally:
        for fd in (calls_r, calls_w, answers_r, answers_w):
            if fd >= 0:
                os.close(fd)
