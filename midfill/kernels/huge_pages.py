"""Tensors on 2 MiB pages, for the weights that every decoded token streams through; and read-ahead
for the file-mapped tensors that stay on disk until a token needs them.

A token reads every weight once. On ordinary 4 KiB pages that stream needs a new address
translation every 4 KiB, and the page walks cost bandwidth; Linux backs memory with 2 MiB
"transparent huge pages" only where it was asked to with madvise (under the usual setting,
"madvise"). Measured on this repo's CPU (Refact-1.6B shape, bf16, benchmarks/RESULTS.md): the
decoder blocks stream at about 0.78 of the read bandwidth on 4 KiB pages and 0.83 on 2 MiB pages.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import sys

import torch
from torch import nn

HUGE_PAGE = 2 << 20
MADV_WILLNEED = 3  # Linux <sys/mman.h>
MADV_HUGEPAGE = 14
ALIGN = 64  # each tensor starts on a cache line
READ_AHEAD_CHUNK = 2 << 20


@functools.cache
def _madvise():
    """libc's madvise, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def read_ahead(tensor: torch.Tensor) -> None:
    """Ask the OS to read a file-mapped tensor's pages into the page cache now, in the background.

    The embedding table stays a view of the checkpoint file (a prompt gathers a few of its rows), so
    without this every token not seen before waits on a disk read: measured on a 1.6B checkpoint
    whose file had left the page cache, the first request after load took 0.5-1.7 s on some steps.
    The pages go to the page cache, not to this process: its resident memory does not grow.
    """
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu":
        return
    start, end = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE, tensor.data_ptr() + tensor.nbytes
    for chunk in range(start, end, READ_AHEAD_CHUNK):  # Linux reads at most its read-ahead window a call
        madvise(chunk, min(READ_AHEAD_CHUNK, end - chunk), MADV_WILLNEED)


def huge_page_bytes(nbytes: int) -> torch.Tensor:
    """An untouched uint8 CPU tensor of nbytes starting on a 2 MiB boundary, advised onto huge pages.

    The advice must come before the first write: pages the kernel already mapped small stay small.
    Where the OS declines (not Linux, huge pages disabled) this is just an aligned tensor.
    """
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    madvise = _madvise()
    if madvise is not None and nbytes >= HUGE_PAGE:
        madvise(raw.data_ptr() + start, nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)
    return raw[start : start + nbytes]


def huge_page_views(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Empty tensors of these (shape, dtype), laid end to end (each on a cache line) in one huge-page
    block, in the order given: the order a decoded token reads them. They live as long as any of them."""
    sizes = [-(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN for shape, dtype in specs]
    block = huge_page_bytes(max(sum(sizes), 1))
    views, offset = [], 0
    for (shape, dtype), size in zip(specs, sizes):
        nbytes = math.prod(shape) * dtype.itemsize
        views.append(block[offset : offset + nbytes].view(dtype).view(shape))
        offset += size
    return views


def move_to_huge_pages(buffers: list[tuple[nn.Module, str]]) -> None:
    """Replace each module buffer (module, name) by a copy in one huge-page block (huge_page_views).

    One buffer at a time, so each old one is freed as its copy lands: the peak is the weights plus
    the largest buffer, not twice the weights.
    """
    specs = [(tuple(getattr(module, name).shape), getattr(module, name).dtype) for module, name in buffers]
    for (module, name), view in zip(buffers, huge_page_views(specs)):
        setattr(module, name, view.copy_(getattr(module, name)))
    _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand the heap pages the old buffers left free back to the OS (glibc keeps them otherwise)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass
