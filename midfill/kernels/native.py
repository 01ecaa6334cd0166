"""Builds decode.c, prefill.c and pack.c on first use, once per instruction set, and calls the best build the CPU runs.

A plain C file with no torch headers compiles in a few seconds, so the package builds it itself,
once per machine and variant, into a cache folder, and binds it with ctypes. VARIANTS lists the
builds, best first; the first whose CPU flags /proc/cpuinfo lists is used, unless MIDFILL_KERNELS
names another (so tests and benchmarks can run each). Anything that stops the kernels (not x86-64,
no AVX2/FMA/F16C, no C compiler, MIDFILL_NATIVE=0) leaves midfill on the pure-torch path, which
gives the same numbers a little slower.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from midfill.errors import MidfillError

SOURCES = tuple(Path(__file__).with_name(name) for name in ("decode.c", "prefill.c", "pack.c"))  # one library
# -fno-tree-pre: with partial redundancy elimination GCC copies every integer accumulator of the int8
# and int4 loops once per turn, a third more instructions there (GCC 12)
COMMON_FLAGS = ("-O2", "-fno-tree-pre", "-fopenmp", "-fPIC", "-shared")
MAX_ROWS = 8  # rows one call multiplies while reading the weights once (MAX_ROWS in decode.c)
OVERRIDE = "MIDFILL_KERNELS"


@dataclass(frozen=True)
class Variant:
    """One build of decode.c: the CPU flags (as /proc/cpuinfo spells them) it needs and is compiled for."""

    name: str
    cpu_flags: tuple[str, ...]

    @property
    def compiler_flags(self) -> list[str]:
        return ["-m" + flag.replace("_", "") for flag in self.cpu_flags]  # avx512_vnni -> -mavx512vnni


_AVX2 = ("avx2", "fma", "f16c")
_AVX512 = (*_AVX2, "avx512f", "avx512bw", "avx512vl")
VARIANTS = (Variant("avx512vnni", (*_AVX512, "avx512_vnni")), Variant("avx512", _AVX512), Variant("avx2", _AVX2))  # best first


def cache_dir() -> Path:
    root = os.environ.get("MIDFILL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "midfill")
    return Path(root).expanduser() / "kernels"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This x86-64 CPU's feature flags; empty on other machines."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(next((line for line in lines if line.startswith("flags")), "").partition(":")[2].split())


def runnable_variants() -> list[str]:
    """The variants this CPU can run, best first."""
    return [v.name for v in VARIANTS if set(v.cpu_flags) <= cpu_flags()]


def chosen_variant() -> Variant | None:
    """The variant MIDFILL_KERNELS names, else the best this CPU runs; None when none runs or MIDFILL_NATIVE=0."""
    if os.environ.get("MIDFILL_NATIVE", "1") == "0":
        return None
    runnable = runnable_variants()
    name = os.environ.get(OVERRIDE) or (runnable[0] if runnable else None)
    if name is None:
        return None
    if name not in {v.name for v in VARIANTS}:
        raise MidfillError(f"{OVERRIDE}={name!r} is not a kernel variant; choose one of {', '.join(v.name for v in VARIANTS)}")
    if name not in runnable:
        raise MidfillError(f"{OVERRIDE}={name}: this CPU cannot run it (it runs {', '.join(runnable) or 'none'})")
    return next(v for v in VARIANTS if v.name == name)


def build(target: Path, flags: list[str]) -> None:
    """Compile to a temporary name, then rename, so a concurrent or killed build never leaves half a library."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found (set CC or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as exc:
        raise OSError(f"compiling {' and '.join(s.name for s in SOURCES)} failed: {exc.stderr.strip()[:500]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load(variant: Variant) -> ctypes.CDLL:
    """One variant's kernels, built first if this machine has no copy of this source with these flags."""
    flags = [*COMMON_FLAGS, *variant.compiler_flags]
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / f"decode-{variant.name}-{digest}.so"
    if not target.exists():
        build(target, flags)
    lib = ctypes.CDLL(str(target))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.midfill_isa.restype = ctypes.c_char_p
    if lib.midfill_isa().decode() != variant.name:
        raise OSError(f"{target.name} was built for {lib.midfill_isa().decode()}, not {variant.name}")
    lib.midfill_linear_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i64]
    lib.midfill_linear_int8.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.midfill_linear_int4.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.midfill_attention_one.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, f32]
    lib.midfill_read_bandwidth.argtypes = [ptr, i64]
    lib.midfill_gemm_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i64]
    lib.midfill_decode_block.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, f32, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64]
    lib.midfill_read_bandwidth.restype = f32
    lib.midfill_pack_int8.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.midfill_pack_int4.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr]
    lib.midfill_widen_bf16.argtypes = [i64, ptr, ptr, ptr, ptr, i64, i64, ptr]
    lib.midfill_pack_int8.restype = lib.midfill_pack_int4.restype = lib.midfill_widen_bf16.restype = None
    for kernel in ("linear_bf16", "linear_int8", "linear_int4", "attention_one", "decode_block", "gemm_bf16"):
        getattr(lib, f"midfill_{kernel}").restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The chosen variant's kernels, or None (with one warning saying why) when this machine cannot use them."""
    variant = chosen_variant()
    if variant is None:
        return None
    try:
        return load(variant)
    except OSError as exc:
        warnings.warn(f"midfill: native CPU kernels unavailable, using the slower torch path ({exc})", stacklevel=2)
        return None


def variant() -> str | None:
    """Which build of the kernels runs (avx512vnni, avx512 or avx2, as the library reports), or None: the torch path."""
    lib = library()
    return None if lib is None else lib.midfill_isa().decode()


def available() -> bool:
    return library() is not None


ATTENTION_HEAD_DIMS = (32, 64, 128)


def _checked(status: int) -> None:
    if status == -1:
        raise MemoryError("midfill native kernel: out of memory for its scratch rows")
    if status != 0:
        raise ValueError(f"midfill native kernel: unsupported shape (status {status})")


def _linear(kernel, x: torch.Tensor, n_out: int, weight_pointers: tuple[int, ...]) -> torch.Tensor:
    """x [rows, K] float32 contiguous through kernel(x, *weights, y, M, N, K), MAX_ROWS rows per call.

    This runs for every layer of every decoded token, so it does nothing a kernel call does not need.
    """
    rows, n_in = x.shape
    y = torch.empty(rows, n_out)
    x_ptr, y_ptr = x.data_ptr(), y.data_ptr()
    for start in range(0, rows, MAX_ROWS):
        m = min(MAX_ROWS, rows - start)
        _checked(kernel(x_ptr + 4 * start * n_in, *weight_pointers, y_ptr + 4 * start * n_out, m, n_out, n_in))
    return y


def linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [rows, K] float32 (contiguous) times bf16 weight [N, K] transposed -> [rows, N] float32."""
    return _linear(library().midfill_linear_bf16, x, weight.shape[0], (weight.data_ptr(),))


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 weight [N, K] with float32 scale [N]."""
    return _linear(library().midfill_linear_int8, x, weight.shape[0], (weight.data_ptr(), scale.data_ptr()))


def linear_int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Packed uint8 weight [N, K/2] with uint8 scale and int8 minimum codes [N, K/32] on float32 steps [N, 2]."""
    pointers = (weight.data_ptr(), scale.data_ptr(), minimum.data_ptr(), steps.data_ptr())
    return _linear(library().midfill_linear_int4, x, weight.shape[0], pointers)


def has_gemm_bf16() -> bool:
    """Whether this build multiplies many rows by bf16 weights itself (prefill.c: AVX-512 builds)."""
    return available() and variant() != "avx2"


def gemm_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 (contiguous) times bf16 weight [N, K] transposed -> [M, N] float32, for many rows:
    float32 products on weights widened a block at a time, never the whole matrix (prefill.c)."""
    y = torch.empty(x.shape[0], weight.shape[0])
    _checked(library().midfill_gemm_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], weight.shape[0], x.shape[1]))
    return y


def pack_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 weight [N, K] (contiguous, K a multiple of 8) -> int8 levels [N, K] and float32 scales [N] (pack.c)."""
    q, scale = torch.empty(weight.shape, dtype=torch.int8), torch.empty(weight.shape[0])
    library().midfill_pack_int8(weight.data_ptr(), weight.shape[0], weight.shape[1], q.data_ptr(), scale.data_ptr())
    return q, scale


def pack_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 weight [N, K] (contiguous, K a multiple of 32) -> packed uint8 [N, K/2], uint8 scale and int8
    minimum codes [N, K/32], float32 steps [N, 2] (pack.c)."""
    n, k = weight.shape
    packed, steps = torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(n, 2)
    scale, minimum = torch.empty(n, k // 32, dtype=torch.uint8), torch.empty(n, k // 32, dtype=torch.int8)
    library().midfill_pack_int4(weight.data_ptr(), n, k, packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), steps.data_ptr())
    return packed, scale, minimum, steps


def widen_bf16(fmt: str, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, steps: torch.Tensor | None,
               out: torch.Tensor) -> torch.Tensor:
    """int8 levels [N, K] (exactly; the row scales are left to the caller) or packed int4 [N, K/2] with its
    codes and steps (rounded) as bf16 into out [N, K] (contiguous), pack.c."""
    pointer = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    library().midfill_widen_bf16(FORMAT_CODES[fmt], weight.data_ptr(), scale.data_ptr(), pointer(minimum), pointer(steps), *out.shape,
                                 out.data_ptr())
    return out


def attention_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax(q k^T / sqrt(D) + bias) v, query b against cache row rows[b]: q [R, H, D]; k, v [B, >=S, D];
    rows [R] int64; bias [R, H, S].

    k and v may be views of a longer cache (rows contiguous, positions past S ignored).
    """
    batch, heads, dim = q.shape
    span = bias.shape[-1]
    if k.stride(2) != 1 or k.stride(1) != dim or v.stride() != k.stride():
        raise ValueError("attention_one needs keys and values laid out [B, positions, D] with the same strides")
    q, rows, bias = q.contiguous(), rows.contiguous(), bias.contiguous()
    out = torch.empty_like(q)
    _checked(
        library().midfill_attention_one(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), rows.data_ptr(), bias.data_ptr(), out.data_ptr(), batch, heads, span, dim,
            k.stride(0), dim**-0.5,
        )
    )  # fmt: skip
    return out


class Matrix(ctypes.Structure):
    """A packed weight as decode.c's Matrix: format code, shape and data pointers."""

    _fields_ = [("format", ctypes.c_int64), ("n_out", ctypes.c_int64), ("n_in", ctypes.c_int64),
                ("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("minimum", ctypes.c_void_p), ("steps", ctypes.c_void_p)]  # fmt: skip


FORMAT_CODES = {"bf16": 0, "int8": 1, "int4": 2}


def matrix(fmt: str, weight: torch.Tensor, scale: torch.Tensor | None, minimum: torch.Tensor | None, steps: torch.Tensor | None,
           n_in: int) -> Matrix:
    pointer = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    return Matrix(FORMAT_CODES[fmt], weight.shape[0], n_in, weight.data_ptr(), pointer(scale), pointer(minimum), pointer(steps))


def decode_block(
    x: torch.Tensor,
    shape: tuple[int, int, int],
    norms: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    matrices: ctypes.Array,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    bias: torch.Tensor,
) -> None:
    """x [R, E] += one decoder block for R new tokens, in place; token r belongs to cache row rows[r].

    shape = (heads, head_dim, mlp_width); matrices = q, kv, attention out, gate_up, mlp out;
    keys/values [B, max_len, D] (one layer of the cache) receive token r at row rows[r], position
    slots[r] (both int64); bias [R, H, S] as for attention_one.
    """
    batch, n_embd = x.shape
    heads, head_dim, width = shape
    _checked(
        library().midfill_decode_block(
            x.data_ptr(), batch, n_embd, heads, head_dim, width, norms[0].data_ptr(), norms[1].data_ptr(), eps,
            ctypes.addressof(matrices), keys.data_ptr(), values.data_ptr(), keys.stride(0), rows.data_ptr(),
            slots.data_ptr(), bias.data_ptr(), bias.shape[-1],
        )
    )  # fmt: skip


def read_bandwidth(data: torch.Tensor) -> float:
    """Sum of a contiguous float32 tensor (length a multiple of 32), read by every thread at full speed."""
    return library().midfill_read_bandwidth(data.data_ptr(), data.numel())
