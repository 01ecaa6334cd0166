"""How a checkpoint runs here: the dtype of its activations, whether its linear weights are packed, and why.

The default ("auto") keeps a checkpoint in the precision it was saved in. Refact-1.6B is bf16; on a
CPU its weights are fastest kept as they are, packed for the native kernels, with float32
activations: decoding reads half the bytes of a float32 copy, and the products equal float32
math on the same weights. `float32` stays for exactness checks; `bfloat16` on a CPU means the same
packed path; `--quantize int8|int4` packs fewer bits still.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from midfill.errors import MidfillError
from midfill.kernels import native

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", *DTYPES)


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # activations and every parameter that is not a packed linear weight
    packed: str | None  # bf16/int8/int4 when the linear weights are packed (midfill.model.quantize)
    reason: str  # one line for `midfill info` and the status page


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise MidfillError(f"unknown dtype {name!r}; choose one of {', '.join(CHOICES)}")
    return DTYPES[name]


def choose_precision(stored: torch.dtype, dtype: str | torch.dtype, quantize: str | None, device: torch.device) -> Precision:
    """The precision for a checkpoint whose weights are stored as `stored`, given --dtype and --quantize."""
    if dtype != "auto":
        parse_dtype(dtype)
    name = str(stored).removeprefix("torch.")
    on_cpu = device.type == "cpu"
    if quantize is not None:
        if on_cpu:
            return Precision(torch.float32, quantize, f"--quantize {quantize}: linear weights packed, float32 activations")
        return Precision(parse_dtype("float32" if dtype == "auto" else dtype), quantize, f"--quantize {quantize} on {device}")
    if dtype == "auto":
        if not on_cpu:
            return Precision(stored, None, f"the checkpoint's own precision ({name}) on {device}")
        if stored != torch.bfloat16:
            return Precision(torch.float32, None, f"the checkpoint is {name}: float32 keeps its weights exactly")
        if not native.available():
            return Precision(torch.bfloat16, None, "bf16 checkpoint; no native kernels on this CPU, so torch's bf16")
        return Precision(torch.float32, "bf16", "bf16 checkpoint kept as bf16, packed for the native kernels (float32 activations)")
    wanted = parse_dtype(dtype)
    if on_cpu and wanted == torch.bfloat16 and native.available():
        return Precision(torch.float32, "bf16", "--dtype bfloat16: bf16 weights packed for the native kernels (float32 activations)")
    return Precision(wanted, None, f"--dtype {dtype}")


def apply_precision(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """Give a float model (one a LoRA adapter was just folded into) the chosen precision, in place."""
    from midfill.model.quantize import quantize_model

    if precision.packed is not None:
        quantize_model(model, precision.packed)
    elif precision.dtype != model.dtype:
        model.to(precision.dtype)
    model.precision = precision
    return model


def describe(model: torch.nn.Module) -> dict[str, str]:
    """Which path a loaded model runs, for `midfill info` and the status page: weights, why, decode, prefill."""
    from midfill.model.decode_step import lean_path_applies, native_blocks
    from midfill.model.packed_prefill import has_bf16_matrix_units

    precision = model.precision
    fmt = model.weight_format
    weights = f"{fmt} packed, {str(model.dtype).removeprefix('torch.')} activations" if fmt else str(model.dtype).removeprefix("torch.")
    if not lean_path_applies(model):
        decode = f"torch on {model.device}"
    elif native_blocks(model) is not None:
        decode = f"native {native.variant()} kernels, one call per block"
    elif fmt is not None and native.available():
        decode = f"native {native.variant()} matrix kernels, a Python step per layer (no fused block for head size {model.config.head_dim})"
    else:
        decode = "torch, a Python step per layer" + ("" if fmt else " (float32 weights: the native kernels are for packed ones)")
    if fmt is None or model.device.type != "cpu":
        prefill = f"torch {str(model.dtype).removeprefix('torch.')} GEMM"
    elif fmt == "bf16":
        if has_bf16_matrix_units():
            prefill = "bf16 products and attention on the bf16 weights, float32 residual and KV cache (bf16 matrix units: " + ("AMX)" if "amx_bf16" in native.cpu_flags() else "AVX512-BF16, timed faster than float32 here)")
        elif native.has_gemm_bf16():
            prefill = f"native {native.variant()} GEMM, float32 products on bf16 weights widened a block at a time"
        else:
            prefill = "torch float32 GEMM, each layer widened in turn (no bf16 matrix units here)"
    elif has_bf16_matrix_units():
        prefill = f"bf16 products and attention, float32 residual and KV cache; each {fmt} layer widened to bf16 in turn (bf16 matrix units)"
    else:
        prefill = "torch int8 GEMM, activations as two int8 codes" + ("" if fmt == "int8" else ", each layer widened to int8 in turn")
    return {"weights": weights, "why": precision.reason if precision else "built in memory", "decode": decode, "prefill": prefill}
