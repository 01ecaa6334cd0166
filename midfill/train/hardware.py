"""What a training run learns about its machine at start-up: the autocast dtype that trains fastest,
the peak FLOP/s that MFU is a fraction of, and the model's FLOPs per token."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from midfill.model import GPTRefactForCausalLM

# Dense bf16 tensor-core peaks from NVIDIA's data sheets; the first name found in the device's name wins.
GPU_PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12),
                       ("L40S", 362e12), ("L4", 121e12))  # fmt: skip
STEP_BUDGET_S = 0.3  # time a measured pass may take on a CPU: fewer rows than a micro-batch when it would take longer


@dataclass
class Hardware:
    """The dtype a run trains in and how it was chosen, and what its MFU is measured against: on a GPU
    the data sheet's bf16 peak whatever the dtype (MFU's usual reference), on a CPU the measured
    matmul peak of the run's dtype."""

    device: str
    dtype: str
    chosen_by: str  # "config", "gpu" (auto on a GPU), "measured" (auto on a CPU) or "checkpoint" (a resumed run's)
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # fwd+bwd rate of each dtype tried, when measured
    peak_flops: float | None = None
    peak_from: str = ""  # "data sheet" or "measured matmul"
    flops_per_token: float = 0.0
    compiled: bool = False

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of one device at this rate, or None when its peak is unknown."""
        return None if self.peak_flops is None else tokens_per_s * self.flops_per_token / self.peak_flops

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        rates = ", ".join(f"{d} {r:,.0f} tok/s" for d, r in self.tokens_per_s.items())
        why = {"config": "as configured", "gpu": "auto on a GPU", "checkpoint": "kept from the checkpoint"}.get(
            self.chosen_by, f"measured fwd+bwd: {rates}")  # fmt: skip
        peak = f"MFU of {self.peak_from} peak {self.peak_flops / 1e9:,.0f} GFLOP/s" if self.peak_flops else "MFU unknown (no peak for this device)"
        return f"{self.device}: {self.dtype} ({why}); {peak}; compile {'on' if self.compiled else 'off'}"


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype`, or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def flops_per_token(model: GPTRefactForCausalLM, block_size: int) -> float:
    """Training FLOPs per token: the model FLOPs of MFU, not whatever a kernel happens to compute.

    Each weight of a matmul (every parameter outside the embedding, lm_head included) costs 2 FLOPs
    forward, 2 for the input gradient and 2 for its own gradient: 6N when all weights train, less
    under LoRA, whose frozen weights get no gradient. Attention's QK^T and AV cost 4 * block * n_embd
    per token and layer forward, three times that with the backward: PaLM's 12 * L * H * Q * T
    (H * Q = n_embd), halved because a causal query sees half the block on average.
    """
    embedding = model.transformer.wte.weight
    weights = [p for p in model.parameters() if p is not embedding]
    n_all, n_trained = sum(p.numel() for p in weights), sum(p.numel() for p in weights if p.requires_grad)
    config = model.config
    return 4 * n_all + 2 * n_trained + 6 * config.n_layer * block_size * config.n_embd


def gpu_peak_flops(name: str) -> float | None:
    return next((flops for key, flops in GPU_PEAK_BF16_FLOPS if key in name), None)


def matmul_peak_flops(dtype: str, device: torch.device) -> float:
    """The best FLOP/s of square 1024 and 2048 matmuls in `dtype`: a CPU's practical peak, which no
    data sheet gives (it depends on the cores this process gets and on their vector units)."""
    best, gen = 0.0, torch.Generator().manual_seed(0)  # its own generator: the run's RNG stays untouched
    for n in (1024, 2048):
        a, b = (torch.randn(n, n, generator=gen).to(device, getattr(torch, dtype)) for _ in range(2))
        a @ b  # warm-up
        for _ in range(3):
            began = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - began))
    return best


def fwd_bwd_rate(model: GPTRefactForCausalLM, dtype: str, ids: torch.Tensor) -> float:
    """Tokens/s of one forward+backward pass over ids [rows, T+1]; the gradients it leaves accumulate."""
    began = time.perf_counter()
    with autocast(dtype, model.device):
        loss = F.cross_entropy(model(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return ids[:, :-1].numel() / (time.perf_counter() - began)


def measure_dtypes(model: GPTRefactForCausalLM, micro_batch: int, block_size: int, rounds: int = 2) -> dict[str, float]:
    """The best fwd+bwd tokens/s of float32 and of bf16 autocast at the run's block size.

    The two take turns, after a warm-up pass of each, so a busy neighbour slows both alike; a pass
    has as many of the micro-batch's rows as keep float32 near STEP_BUDGET_S (the ratio decides,
    not the rate). It leaves no trace in the run: no optimizer step, gradients set back to None,
    tokens from a generator of their own, and any dropout's draws inside a forked RNG.
    """
    ids = torch.randint(model.config.vocab_size, (micro_batch, block_size + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    rates = {"float32": 0.0, "bfloat16": 0.0}
    with torch.random.fork_rng(devices=[]):
        one_row = fwd_bwd_rate(model, "float32", ids[:1])
        rows = max(1, min(micro_batch, int(STEP_BUDGET_S * one_row / block_size)))
        for turn in range(rounds + 1):
            for dtype in rates:
                rate = fwd_bwd_rate(model, dtype, ids[:rows])
                if turn > 0:  # turn 0 warms each dtype up
                    rates[dtype] = max(rates[dtype], rate)
    model.zero_grad(set_to_none=True)
    return rates


def survey(model: GPTRefactForCausalLM, dtype: str, compiled: bool, micro_batch: int, block_size: int,
           kept: str | None = None, agree: Callable[[dict[str, float]], dict[str, float]] | None = None) -> Hardware:  # fmt: skip
    """The run's dtype and MFU reference on the model's device.

    dtype "auto" is bf16 on a GPU without measuring: every GPU this trainer targets has bf16 tensor
    cores several times faster than its float32 path, and bf16 needs no loss scaling. On a CPU the
    answer depends on the chip (AMX makes bf16 ~2x faster than float32, AVX512-BF16 alone ~1.5x
    slower, plain AVX2 far slower), so "auto" times both on this model and takes the faster.
    `kept` is a resumed run's dtype, kept so that its losses continue one trajectory; `agree` makes
    every process of a distributed run decide from the same (averaged) rates.
    """
    device = model.device
    hardware = Hardware(device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type, dtype=dtype,
                        chosen_by="config", flops_per_token=flops_per_token(model, block_size), compiled=compiled)  # fmt: skip
    if dtype == "auto" and kept is not None:
        hardware.dtype, hardware.chosen_by = kept, "checkpoint"
    elif dtype == "auto" and device.type == "cuda":
        hardware.dtype, hardware.chosen_by = "bfloat16", "gpu"
    elif dtype == "auto":
        rates = measure_dtypes(model, micro_batch, block_size)
        hardware.tokens_per_s = agree(rates) if agree is not None else rates
        hardware.dtype, hardware.chosen_by = max(hardware.tokens_per_s, key=hardware.tokens_per_s.get), "measured"
    if device.type == "cuda":
        hardware.peak_flops = gpu_peak_flops(hardware.device)
        hardware.peak_from = "data sheet" if hardware.peak_flops else ""
    else:
        hardware.peak_flops, hardware.peak_from = matmul_peak_flops(hardware.dtype, device), "measured matmul"
    return hardware
