"""Builds gemv.c on first use and calls it through ctypes; None where it cannot run.

A plain C file with no torch headers compiles in about a second, so the package builds it
itself, once per machine, into a cache folder. Anything that stops it (not x86-64, no AVX2/FMA/F16C,
no C compiler, MIDFILL_NATIVE=0) leaves midfill on the pure-torch path, which gives the same
numbers a little slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared"]
MAX_ROWS = 4  # rows one call multiplies while reading the weights once (MAX_ROWS in gemv.c)
CPU_FEATURES = ("avx2", "fma", "f16c")


def cache_dir() -> Path:
    root = os.environ.get("MIDFILL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "midfill")
    return Path(root).expanduser() / "kernels"


def cpu_supported() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(feature in flags for feature in CPU_FEATURES)


def build(target: Path) -> None:
    """Compile to a temporary name, then rename, so a concurrent or killed build never leaves half a library."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found (set CC or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as exc:
        raise OSError(f"compiling {SOURCE.name} failed: {exc.stderr.strip()[:500]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning saying why) when this machine cannot use them."""
    if os.environ.get("MIDFILL_NATIVE", "1") == "0" or not cpu_supported():
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"gemv-{digest}.so"
    try:
        if not target.exists():
            build(target)
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        warnings.warn(f"midfill: native CPU kernels unavailable, using the slower torch path ({exc})", stacklevel=2)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.midfill_linear_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i64]
    lib.midfill_linear_int8.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.midfill_linear_int4.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.midfill_read_bandwidth.argtypes = [ptr, i64]
    lib.midfill_read_bandwidth.restype = ctypes.c_float
    for name in ("midfill_linear_bf16", "midfill_linear_int8", "midfill_linear_int4"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def available() -> bool:
    return library() is not None


def _rows(x: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.reshape(-1, x.shape[-1]).float().contiguous()
    return x, torch.empty(x.shape[0], out_features, dtype=torch.float32)


def _chunks(x: torch.Tensor, y: torch.Tensor):
    for start in range(0, x.shape[0], MAX_ROWS):
        yield x[start : start + MAX_ROWS], y[start : start + MAX_ROWS]


def _checked(status: int) -> None:
    if status != 0:
        raise MemoryError("midfill native kernel: out of memory for its scratch rows")


def linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 times bf16 weight [N, K] transposed -> [rows, N] float32."""
    lib = library()
    x, y = _rows(x, weight.shape[0])
    for xs, ys in _chunks(x, y):
        _checked(lib.midfill_linear_bf16(xs.data_ptr(), weight.data_ptr(), ys.data_ptr(), xs.shape[0], *weight.shape))
    return y


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 weight [N, K] with float32 scale [N]."""
    lib = library()
    x, y = _rows(x, weight.shape[0])
    for xs, ys in _chunks(x, y):
        _checked(lib.midfill_linear_int8(xs.data_ptr(), weight.data_ptr(), scale.data_ptr(), ys.data_ptr(), xs.shape[0], *weight.shape))
    return y


def linear_int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """Packed uint8 weight [N, K/2] with float16 scale and minimum [N, K/32]."""
    lib = library()
    n_out, in_features = weight.shape[0], weight.shape[1] * 2
    x, y = _rows(x, n_out)
    for xs, ys in _chunks(x, y):
        _checked(
            lib.midfill_linear_int4(
                xs.data_ptr(), weight.data_ptr(), scale.data_ptr(), minimum.data_ptr(), ys.data_ptr(), xs.shape[0], n_out, in_features
            )
        )
    return y


def read_bandwidth(data: torch.Tensor) -> float:
    """Sum of a contiguous float32 tensor (length a multiple of 32), read by every thread at full speed."""
    return library().midfill_read_bandwidth(data.data_ptr(), data.numel())
