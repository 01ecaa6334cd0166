"""Running model-written programs without trusting them.

Each program runs in a fresh temporary folder as its working directory, in a new session
(process group), with a scrubbed environment and resource limits: CPU seconds, address space,
file size, open files and process count, plus a wall-clock timeout after which everything the
program started is killed. Output is capped (the last bytes are kept).

On Linux as root (as on many CI machines and containers), where a process-count limit does not
bind, the program also gets:
- its own user id, from a range no account and no running process uses (checked), unique per
  evaluating process, so RLIMIT_NPROC contains fork bombs and, at the end, "kill every process
  of that user" reaches even processes that left the process group;
- its own network namespace (no interfaces but a down loopback: no network at all);
- its own mount namespace where every place it may write (its folder, /tmp, /var/tmp, /dev/shm,
  /run/lock) is one tmpfs of `disk_bytes` in all, gone when its last process ends.
Where mounts are refused (a container without CAP_SYS_ADMIN), what its user left in those
folders is deleted afterwards instead, and only each file's size is capped. Without root, the
limits and the process-group kill still apply; the network is not isolated.

The sandbox makes its process a child subreaper (Linux), so that processes orphaned by a killed
program are reparented to it and reaped, instead of lingering as zombies that would count against
the next program's process limit. Run one program at a time per process (eval uses a process pool).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from midfill.errors import MidfillError

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
PR_SET_CHILD_SUBREAPER = 36
PR_SET_DUMPABLE = 4
# Sandbox uids are SANDBOX_UID_BASE + the evaluating process's pid: far above any account that
# useradd, systemd's dynamic users (61184-65519), `nobody` (65534) or the usual subuid ranges give out.
SANDBOX_UID_BASE = 3_000_000_000
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # where anyone may write outside their folder


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 2 * 2**30
    file_bytes: int = 16 * 2**20
    processes: int = 32
    open_files: int = 64
    output_bytes: int = 64 * 2**10
    disk_bytes: int = 64 * 2**20  # all the program may write, where it runs in its own mount namespace


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


def pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 2**22  # the kernel's ceiling


def uid_mapped(uid: int) -> bool:
    """Whether this (possibly namespaced) system can switch to `uid` at all."""
    try:
        ranges = [tuple(map(int, line.split())) for line in Path("/proc/self/uid_map").read_text().splitlines()]
    except OSError:
        return True  # no user namespaces: every 32-bit uid exists
    return any(inside <= uid < inside + count for inside, _, count in ranges)


def uid_in_use(uid: int) -> bool:
    """Whether an account has this uid or a running process runs as it."""
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid_line = next(line for line in status.read_text().splitlines() if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if str(uid) in uid_line.split()[1:]:
            return True
    return False


def sandbox_uid(pid: int) -> int:
    """This evaluating process's sandbox uid: unique among running processes, used by nobody else."""
    base = SANDBOX_UID_BASE if uid_mapped(SANDBOX_UID_BASE + pid_max()) else 100_000  # a small uid map: its low end
    uid = base + pid
    if not uid_mapped(uid) or uid_in_use(uid):
        raise MidfillError(f"the sandbox user id {uid} is not free here (an account or a process uses it, or the "
                           "system cannot switch to it); evaluation needs an unused user id per worker")
    return uid


def libc_call(name: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        raise OSError(ctypes.get_errno(), f"{name}: {os.strerror(ctypes.get_errno())}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, options: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    libc_call("mount", encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(options))


def private_writable_places(folder: Path, files: dict[str, str], uid: int, size: int) -> None:
    """In a new mount namespace: one tmpfs of `size` bytes for the folder and every shared writable place.

    Runs in the child before exec, as root. The folder's path stays the same (HOME and TMPDIR point
    at it), and its files are written anew inside the tmpfs.
    """
    libc_call("unshare", CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("midfill-sandbox", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")
    for shared in SHARED_WRITABLE[1:]:
        if os.path.isdir(shared) and not os.path.islink(shared):
            inside = f"/tmp/.{shared.strip('/').replace('/', '-')}"
            os.mkdir(inside, 0o1777)
            os.chmod(inside, 0o1777)
            mount(inside, shared, None, MS_BIND)
    os.makedirs(folder.parent, mode=0o711)
    os.mkdir(folder, 0o700)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    for path in [folder, *folder.iterdir()]:
        os.chown(path, uid, uid)
    os.chdir(folder)


def mount_namespaces_work() -> bool:
    """Whether this process may make a mount namespace with a tmpfs (root with CAP_SYS_ADMIN)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        try:
            libc_call("unshare", CLONE_NEWNS)
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            mount("midfill-probe", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m")
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitpid(child, 0)[1] == 0


class Program:
    """A started program: wait for it, or talk to it through the pipes it was given."""

    def __init__(self, proc: subprocess.Popen, out, err, limits: Limits) -> None:
        self.proc = proc
        self.out, self.err = out, err
        self.limits = limits
        self.started = time.monotonic()

    def wait(self) -> Outcome:
        """Wait for the program until the wall-clock limit; classify how it ended."""
        try:
            returncode = self.proc.wait(timeout=max(0.0, self.started + self.limits.wall_seconds - time.monotonic()))
        except subprocess.TimeoutExpired:
            return self.outcome("timeout", None)
        return self.outcome("passed" if returncode == 0 else "failed", returncode)

    def outcome(self, status: str, returncode: int | None) -> Outcome:
        return Outcome(status, returncode, self.tail(self.out), self.tail(self.err), time.monotonic() - self.started)

    def tail(self, f) -> str:
        """The last `output_bytes` of an output file: a program's verdict is usually at its end."""
        f.flush()
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - self.limits.output_bytes))
        return f.read().decode("utf-8", errors="replace")


class Sandbox:
    """Runs programs, one at a time; parallel workers are separate processes, each with its own user id."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self.is_root = os.geteuid() == 0
        self.uid = sandbox_uid(os.getpid()) if self.is_root else None
        self.private_mounts = mount_namespaces_work()
        if sys.platform == "linux":
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            if not self.is_root:  # programs run as our own user: keep them out of our memory (ptrace, /proc/PID/mem)
                libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)

    def run_python(self, code: str) -> Outcome:
        return self.run([python_for(self.uid), "-I", "main.py"], {"main.py": code})

    def run(self, command: list[str], files: dict[str, str]) -> Outcome:
        """Run `command` in a fresh folder holding `files`; classify how it ended."""
        with self.started(command, files) as program:
            return program.wait()

    @contextmanager
    def started(self, command: list[str], files: dict[str, str], pass_fds: tuple[int, ...] = ()) -> Iterator[Program]:
        """The program, running in a fresh folder holding `files`; when the block ends, it and
        everything it started are killed and what it wrote is gone."""
        # a private parent owned by us, so the program's own folder is never a top-level entry of /tmp
        # (which the clean-up of what the program's user left there would delete)
        parent = Path(tempfile.mkdtemp(prefix="midfill-sandbox-"))
        folder = parent / "run"
        proc = None
        try:
            folder.mkdir()
            for name, text in files.items():
                (folder / name).write_text(text, encoding="utf-8")
            if self.uid is not None:
                parent.chmod(0o711)
                for path in [folder, *folder.iterdir()]:
                    os.chown(path, self.uid, self.uid)
            env = {"PATH": SAFE_PATH, "HOME": str(folder), "TMPDIR": str(folder), "LANG": "C.UTF-8",
                   "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
            with open(parent / "stdout", "w+b") as out, open(parent / "stderr", "w+b") as err:
                proc = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        preexec_fn=lambda: self._confine(folder, files), close_fds=True, pass_fds=pass_fds)
                try:
                    yield Program(proc, out, err, self.limits)
                finally:
                    self._kill_everything(proc)
                    proc.wait()
                    reap_orphans()
                    self._remove_leftover_files()
        finally:
            shutil.rmtree(parent, ignore_errors=True)

    def _confine(self, folder: Path, files: dict[str, str]) -> None:
        """Runs in the child between fork and exec: new session, limits, no network, own user."""
        os.setsid()
        limits = self.limits
        if self.uid is not None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.unshare(CLONE_NEWNET)  # best effort: without it the program still runs, just networked
            if self.private_mounts:
                private_writable_places(folder, files, self.uid, limits.disk_bytes)
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.uid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
            os.setgroups([])
            os.setgid(self.uid)
            os.setuid(self.uid)

    def _remove_leftover_files(self) -> None:
        """Delete what the program's user left in world-writable folders (the only places outside
        its own folder it can write to), where it had no mount namespace of its own."""
        if self.uid is None or self.private_mounts:
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
