"""Many-row products on packed weights (prefill and long verifications), with no float32 copy of the model.

Decoding reads each weight once per token and is bound by memory; a prompt multiplies hundreds of
rows by each weight and is bound by arithmetic, so it goes to the fastest matrix units at hand:
- bf16: where torch's bf16 GEMM (oneDNN) beats float32 arithmetic (AMX; AVX512-BF16 on some cores,
  timed once), that GEMM on the weights as they are (activations rounded to bf16, products summed
  in float32). Elsewhere float32 arithmetic is the fastest (on a Xeon without AMX, AVX512-BF16's dot
  product runs at half float32 FMA's rate): with AVX-512, prefill.c
  widens the weights a block at a time as it multiplies (as fast as torch's float32 GEMM, and no
  float32 copy); on AVX2, the one layer is widened and multiplied by torch's float32 GEMM.
- int8: activations split into two int8 codes per value (as fine as int16) and two of torch's int8
  GEMMs (VNNI or AMX through oneDNN): on this repo's AVX-512 Xeon 2.3x float32's rate. The
  weights are read as stored.
- int4: the layer is widened to int8 (one scale per row) in a scratch buffer, then as int8.
The reference for each is written out in tests/test_precision.py. Where the CPU has bf16 matrix
units, a whole prompt on packed weights computes in bf16 instead (quantize.bf16_prompt; int8 and
int4 layers widened to bf16 a tile at a time, widened_bf16_product), and these
float32-input products serve only what stays float32 there (lm_head over every position).
"""

from __future__ import annotations

import functools
import threading
import time

import torch
import torch.nn.functional as F

from midfill.kernels import native
from midfill.kernels.native import cpu_flags

TIMED_PRODUCT = (256, 2048, 2048)  # rows, K, N: a prompt chunk against a 1.6B-sized layer
_scratch = threading.local()  # .buffer: this thread's bf16 widening buffer, one tile of a layer


def best_time(product, rows: torch.Tensor, weight: torch.Tensor) -> float:
    """Seconds of the fastest of three calls, after one that warms caches and oneDNN's kernel choice."""
    product(rows, weight)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        product(rows, weight)
        times.append(time.perf_counter() - start)
    return min(times)


@functools.cache
def has_bf16_matrix_units() -> bool:
    """Whether torch's bf16 GEMM (oneDNN) beats this CPU's float32 path for prompts. AMX tiles do,
    several times over. With AVX512-BF16 alone it depends on the core (a Xeon without AMX: half float32's
    rate; a Zen 4: several times it), so there the two are timed once on a prompt-sized product (~0.3 s)."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True
    if "avx512_bf16" not in flags:
        return False
    rows, k, n = TIMED_PRODUCT
    x, weight = torch.randn(rows, k), torch.randn(n, k, dtype=torch.bfloat16).mul_(0.02)  # no float32 weight: 24 MB less at peak
    bf16 = best_time(lambda r, w: F.linear(r.bfloat16(), w), x, weight)
    float32 = best_time(native.gemm_bf16 if native.has_gemm_bf16() else (lambda r, w: F.linear(r, w.float())), x, weight)
    return bf16 < 0.8 * float32


def int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes [M, K] and float32 scales [M] for float32 rows [M, K]: rows ~= q * scale."""
    scale = rows.abs().amax(dim=1).clamp(min=1e-30) / 127
    return torch.round(rows / scale[:, None]).to(torch.int8), scale


def int8_product(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """rows [M, K] float32 times int8 weight [N, K] with scales [N] -> [M, N] float32, in int8 arithmetic.

    One int8 code per activation loses too much (top-1 agreement of the embedded model's int8 prompt
    logits with bf16 falls from 99.4% to 97.8%); a second code for the remainder, at 1/256 of the step,
    makes the activations as fine as int16 (the decode kernels' precision: agreement back to 99.4%)
    for two int8 products, still 2.3x float32's rate here.
    """
    coarse, scale = int8_rows(rows)
    remainder = rows - coarse.float() * scale[:, None]
    fine = torch.round(remainder * (256 / scale[:, None])).clamp_(-127, 127).to(torch.int8)
    y = torch._int_mm(coarse, weight.t()).float().add_(torch._int_mm(fine, weight.t()).float(), alpha=1 / 256)
    return y.mul_(scale[:, None]).mul_(weight_scale[None, :])


def bf16_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if has_bf16_matrix_units():
        return F.linear(rows.bfloat16(), weight).float()
    if native.has_gemm_bf16():
        return native.gemm_bf16(rows, weight)
    return F.linear(rows, weight.float())


WIDEN_TILE_BYTES = 16 << 20  # bf16 weights widened per product call: int4 prompts ran 0.85x at 4 MiB, 0.97x at 16 (Zen 4)


def widened_bf16_product(
    x: torch.Tensor, fmt: str, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, steps: torch.Tensor | None
) -> torch.Tensor:
    """bf16 x [..., K] times an int8 (levels, exact; the row scales are left to the caller) or int4
    (rounded) layer widened to bf16, a tile of rows at a time into a buffer this thread reuses: a fresh
    buffer per layer cost about 20 ms of page faults a layer, one as large as the largest layer (46 MB
    for the 1.6B model's gate_up) stayed resident for the process's life, and widening int4 through its
    float32 unpack took half of a prompt's time."""
    n_out, n_in = weight.shape[0], weight.shape[1] * (2 if fmt == "int4" else 1)
    tile = max(1, WIDEN_TILE_BYTES // (2 * n_in))
    need, buffer = min(tile, n_out) * n_in, getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < need:  # one tile's worth at once, not regrown layer by layer
        buffer = _scratch.buffer = torch.empty(max(need, WIDEN_TILE_BYTES // 2), dtype=torch.bfloat16)
    y = x.new_empty(*x.shape[:-1], n_out)
    for start in range(0, n_out, tile):
        rows = slice(start, min(start + tile, n_out))
        widened = buffer[: (rows.stop - start) * n_in].view(-1, n_in)
        native.widen_bf16(fmt, weight[rows], scale[rows], *(None if t is None else t[rows] for t in (minimum, steps)), widened)
        y[..., rows] = F.linear(x, widened)
    return y
