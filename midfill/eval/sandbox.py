"""Running model-written programs without trusting them.

Each program runs in a fresh temporary folder as its working directory, in a new session
(process group), with a scrubbed environment and resource limits: CPU seconds, address space,
file size, open files and process count, plus a wall-clock timeout after which everything the
program started is killed. Output is capped.

On Linux as root (as on many CI machines and containers), where a process-count limit does not
bind, the program also gets:
- its own user id (60000 + the evaluating process's pid, unique among running processes), so
  RLIMIT_NPROC contains fork bombs and, at the end,
  "kill every process of that user" reaches even processes that left the process group;
- its own network namespace (no interfaces but a down loopback: no network at all).
Without root, the limits and the process-group kill still apply; the network is not isolated.
A program can write outside its folder only where everyone may (/tmp, /var/tmp, /dev/shm); what
its user left there is deleted after it ends.

The sandbox makes its process a child subreaper (Linux), so that processes orphaned by a killed
program are reparented to it and reaped, instead of lingering as zombies that would count against
the next program's process limit. Run one program at a time per process (eval uses a process pool).
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from midfill.errors import MidfillError

CLONE_NEWNET = 0x40000000
PR_SET_CHILD_SUBREAPER = 36
SANDBOX_UID_BASE = 60000
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")  # where a program may write outside its folder


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 2 * 2**30
    file_bytes: int = 16 * 2**20
    processes: int = 32
    open_files: int = 64
    output_bytes: int = 64 * 2**10


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed", "failed" (non-zero exit or killed by a signal) or "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def world_executable(path: str) -> bool:
    """Whether any user may run `path`: every folder on its real path and the file are o+x."""
    real = Path(os.path.realpath(path))
    for part in [*reversed(real.parents), real]:
        try:
            if not os.stat(part).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def python_for(uid: int | None) -> str:
    """An interpreter the sandbox user can run: this one if it can, else a system python3."""
    if uid is None or world_executable(sys.executable):
        return sys.executable
    for candidate in SAFE_PATH.split(":"):
        path = os.path.join(candidate, "python3")
        if os.path.exists(path) and world_executable(path):
            return path
    raise MidfillError("no python3 that an unprivileged sandbox user can run; install one in /usr/bin")


class Sandbox:
    """Runs programs, one at a time; parallel workers are separate processes, each with its own user id."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self.is_root = os.geteuid() == 0
        self.uid = SANDBOX_UID_BASE + os.getpid() if self.is_root else None
        if sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def run_python(self, code: str) -> Outcome:
        return self.run([python_for(self.uid), "-I", "main.py"], {"main.py": code})

    def run(self, command: list[str], files: dict[str, str]) -> Outcome:
        """Run `command` in a fresh folder holding `files`; classify how it ended."""
        # a private parent owned by us, so the program's own folder is never a top-level entry of /tmp
        # (which the clean-up of what the program's user left there would delete)
        parent = Path(tempfile.mkdtemp(prefix="midfill-sandbox-"))
        folder = parent / "run"
        try:
            folder.mkdir()
            for name, text in files.items():
                (folder / name).write_text(text, encoding="utf-8")
            if self.uid is not None:
                parent.chmod(0o711)
                for path in [folder, *folder.iterdir()]:
                    os.chown(path, self.uid, self.uid)
            return self._execute(command, folder)
        finally:
            shutil.rmtree(parent, ignore_errors=True)

    def _execute(self, command: list[str], folder: Path) -> Outcome:
        env = {"PATH": SAFE_PATH, "HOME": str(folder), "TMPDIR": str(folder), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        started = time.monotonic()
        with open(folder / ".stdout", "w+b") as out, open(folder / ".stderr", "w+b") as err:
            proc = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    preexec_fn=self._confine, close_fds=True)
            try:
                returncode = proc.wait(timeout=self.limits.wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            self._kill_everything(proc)
            if returncode is None:
                proc.wait()
            reap_orphans()
            self._remove_leftover_files()
            seconds = time.monotonic() - started
            stdout, stderr = (self._read(f) for f in (out, err))
        status = "timeout" if timed_out else ("passed" if returncode == 0 else "failed")
        return Outcome(status, returncode, stdout, stderr, seconds)

    def _read(self, f) -> str:
        f.seek(0)
        return f.read(self.limits.output_bytes).decode("utf-8", errors="replace")

    def _confine(self) -> None:
        """Runs in the child between fork and exec: new session, limits, no network, own user."""
        os.setsid()
        limits = self.limits
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.uid is not None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.unshare(CLONE_NEWNET)  # best effort: without it the program still runs, just networked
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
            os.setgroups([])
            os.setgid(self.uid)
            os.setuid(self.uid)

    def _remove_leftover_files(self) -> None:
        """Delete what the program's user left in world-writable folders (the only places outside
        its own folder it can write to)."""
        if self.uid is None:
            return
        for shared in SHARED_WRITABLE:
            try:
                entries = list(os.scandir(shared))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.stat(follow_symlinks=False).st_uid != self.uid:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                except OSError:
                    pass

    def _kill_everything(self, proc: subprocess.Popen) -> None:
        """SIGKILL the program's process group, and as its own user, every process that user has."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.uid is None:
            return
        killer = os.fork()
        if killer == 0:  # pragma: no cover - runs in the forked child
            try:
                os.setgid(self.uid)
                os.setuid(self.uid)
                for _ in range(3):  # a fork bomb may still be forking between rounds
                    os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
            os._exit(0)
        os.waitpid(killer, 0)


def reap_orphans() -> None:
    """Collect the exit status of every finished child (orphans reparented to this subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
