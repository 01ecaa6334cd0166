"""Process pools whose workers end when the process that started them does.

A pool's workers block reading their task queue; if the parent is SIGKILLed nobody closes it,
and each worker (hundreds of MB after a fork) would wait forever. On Linux the kernel sends
them SIGKILL when the parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was asked for
            os._exit(1)
    if initializer is not None:
        initializer(*initargs)


def worker_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A process pool (forked where possible: workers start without re-importing) that dies with this process."""
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=get_context(method), initializer=_die_with_parent,
                               initargs=(os.getpid(), initializer, initargs))
