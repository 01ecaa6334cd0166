"""The sandbox holds against hostile programs: loops, fork bombs, escapers, memory and disk hogs, network."""

from __future__ import annotations

import os
import subprocess

import pytest

from midfill.eval.sandbox import Limits, Sandbox

ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(wall_seconds=3, cpu_seconds=2, memory_bytes=512 * 2**20, file_bytes=2**20, processes=16))


def leftovers(uid: int) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "uid=,stat=,pid="], capture_output=True, text=True).stdout.split("\n")
    return [line for line in ps if line.split() and line.split()[0] == str(uid)]


def test_passing_and_failing_programs(sandbox):
    assert sandbox.run_python("assert sum([1, 2]) == 3\nprint('ok')").passed
    outcome = sandbox.run_python("assert 1 == 2")
    assert outcome.status == "failed" and "AssertionError" in outcome.stderr


def test_runs_in_a_fresh_folder_with_a_scrubbed_environment(sandbox):
    os.environ["MIDFILL_SECRET_TEST"] = "leak"
    try:
        outcome = sandbox.run_python("import os\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(os.listdir('.'))")
    finally:
        del os.environ["MIDFILL_SECRET_TEST"]
    cwd, env, listing = outcome.stdout.splitlines()
    assert "midfill-sandbox-" in cwd and "MIDFILL_SECRET_TEST" not in env and "main.py" in listing
    assert not os.path.exists(cwd)  # removed afterwards


def test_infinite_loop_and_sleep_time_out(sandbox):
    assert sandbox.run_python("while True: pass").status in ("timeout", "failed")  # CPU limit or wall clock
    outcome = sandbox.run_python("import time\ntime.sleep(60)")
    assert outcome.status == "timeout" and outcome.seconds < 10


def test_memory_and_file_size_are_capped(sandbox):
    assert "MemoryError" in sandbox.run_python("x = bytearray(2 * 2**30)").stderr
    outcome = sandbox.run_python("open('big', 'wb').write(b'x' * 10**7)")
    assert outcome.status == "failed"


def test_output_is_capped(sandbox):
    outcome = sandbox.run_python("print('x' * 500_000)")
    assert len(outcome.stdout) == Limits().output_bytes


@pytest.mark.skipif(not ROOT, reason="process-count limits, own user ids and network namespaces need root here")
def test_fork_bomb_is_contained_and_cleaned_up(sandbox):
    outcome = sandbox.run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert outcome.status in ("timeout", "failed")
    assert leftovers(sandbox.uid) == []
    assert sandbox.run_python("import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.wait()\nprint('forked')").passed


@pytest.mark.skipif(not ROOT, reason="killing escaped processes by user id needs root here")
def test_processes_that_leave_the_group_are_killed(sandbox):
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent exits')"
    assert sandbox.run_python(code).passed
    assert leftovers(sandbox.uid) == []


@pytest.mark.skipif(not ROOT, reason="network namespaces need root here")
def test_no_network(sandbox):
    code = "import socket\nsocket.create_connection(('127.0.0.1', 1), timeout=1)"
    outcome = sandbox.run_python(code)
    assert outcome.status == "failed"
    assert "Network is unreachable" in outcome.stderr or "Connection refused" in outcome.stderr
    external = sandbox.run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)")
    assert "unreachable" in external.stderr


def test_node_programs_run_too():
    import shutil

    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    # V8 reserves a large address space up front; its heap is capped by its own flag instead
    node = Sandbox(Limits(wall_seconds=10, memory_bytes=16 * 2**30))
    outcome = node.run(["node", "--max-old-space-size=256", "main.js"], {"main.js": "console.log(1 + 1)"})
    assert outcome.stdout.strip() == "2"


@pytest.mark.skipif(not ROOT, reason="own user ids need root here")
def test_sandbox_uid_is_from_an_unused_range():
    import pwd

    from midfill.eval.sandbox import SANDBOX_UID_BASE, pid_max, sandbox_uid, uid_in_use

    uid = sandbox_uid(os.getpid())
    assert uid >= SANDBOX_UID_BASE and uid not in [p.pw_uid for p in pwd.getpwall()]
    assert not uid_in_use(uid) and uid_in_use(0)  # root: an account and running processes
    assert sandbox_uid(pid_max() - 1) != sandbox_uid(1)  # unique per evaluating process
    assert sandbox_uid(65534 - 60000) != 65534  # the old scheme's collision with `nobody`


@pytest.mark.skipif(not ROOT, reason="mount namespaces need root here")
def test_writes_outside_the_folder_are_capped_in_total_and_vanish(sandbox):
    if not sandbox.private_mounts:
        pytest.skip("this machine refuses mount namespaces (no CAP_SYS_ADMIN); leftovers are deleted instead")
    before = set(os.listdir("/dev/shm"))
    code = ("import os\nn = 0\ntry:\n    for place in ('/dev/shm', '/tmp', '/var/tmp', '/run/lock', '.'):\n"
            "        for i in range(200):\n            open(f'{place}/f{i}', 'wb').write(b'x' * 2**19)\n            n += 1\n"
            "except OSError as e:\n    print(n, e.errno)\n")
    outcome = sandbox.run_python(code)
    written, errno_ = map(int, outcome.stdout.split())
    assert errno_ == 28 and written * 2**19 <= Limits().disk_bytes  # ENOSPC: the whole tmpfs is full
    assert set(os.listdir("/dev/shm")) == before
    assert sandbox.run_python("open('/run/lock/midfill-survivor', 'w').write('x')").passed
    assert not os.path.exists("/run/lock/midfill-survivor")  # /run/lock is not cleaned by anyone else


def test_a_correct_program_with_long_output_still_passes(sandbox):
    outcome = sandbox.run_python("print('x' * 200_000)\nprint('the end')")
    assert outcome.passed and outcome.stdout.rstrip().endswith("the end")  # the tail is what is kept
