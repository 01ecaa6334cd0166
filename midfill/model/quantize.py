"""Compact weight formats (bf16, int8, int4) for the linear layers, applied in float32.

Decoding one token reads every weight once, so fewer bytes per weight is more tokens per second.
Activations, norms, attention and the KV cache stay float32: on a CPU that is the fast path, and
only the weights are approximated (except a prompt where the CPU has bf16 matrix units: see
bf16_prompt). The pure-torch `unpack`, `int8_levels` and `int4_levels` are the
references that the native kernels (midfill/kernels: decode.c multiplies, pack.c packs) are tested
against, and the path used where they cannot run.
"""

from __future__ import annotations

import itertools
import re

import torch
import torch.nn.functional as F
from torch import nn

from midfill.errors import MidfillError
from midfill.kernels import native
from midfill.kernels.huge_pages import move_to_huge_pages
from midfill.model.packed_prefill import bf16_product, has_bf16_matrix_units, int8_product, int8_rows, widened_bf16_product

FORMATS = ("bf16", "int8", "int4")
GROUP = 32  # int4 weights per scale/minimum pair
NATIVE_MAX_ROWS = 16  # above this many rows (prefill) a GEMM (packed_prefill.py) beats the decode kernels
# The layers whose rounding moves the top-1 token most keep a wider format (as llama.cpp's mixes
# do); patterns match whole layer names. For int4, lm_head and the shared K/V head matter most, then
# the first blocks: on the embedded model blocks 0-1 in int8 take int4's top-1 agreement with bf16
# from 93.8% to 95.6% (3.3% more bytes a token on the 1.6B). int8 keeps block 0 in bf16 (2.7% more
# bytes) but not lm_head: with float32 activations on 16 x 512 held-out tokens of the embedded model,
# agreement with exact float32 is 99.04% so, 98.79% with lm_head in bf16 as well (6.3% more bytes a
# token on the 1.6B: llama.cpp's q8_0 file, all q8_0, then read fewer bytes and decoded faster).
WIDER_LAYERS = {
    "bf16": {},
    "int8": {r"transformer\.h\.0\..*": "bf16"},
    "int4": {r"lm_head": "int8", r".*\.attn\.kv": "int8", r"transformer\.h\.[01]\..*": "int8"},
}
# Rounding to the nearest level, then refitting scale (and minimum) by least squares to those levels,
# never increases the squared error, but it stops at the optimum nearest where it started. Starting
# also from ranges moved in or out by a few percent of the span at either end finds 10% less int4
# error than from min/max alone; on the embedded model int4's agreement goes from 93.1% to 93.8%.
RANGE_STARTS = (-0.04, 0.0, 0.05)  # fraction of the span each end moves in by (negative: out); pack.c has the same
REFIT_ROUNDS = 3  # pack.c has the same
CHUNK = 1 << 17  # weights fitted at once: intermediates that stay in cache make packing several times faster


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise MidfillError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def int8_scale(rows: torch.Tensor) -> torch.Tensor:
    """One float32 scale per row for levels -127..127: max |w| / 127, refitted."""
    scale = rows.abs().amax(dim=1).clamp(min=1e-12) / 127
    best_scale, best_error = scale, torch.full_like(scale, float("inf"))
    for _ in range(REFIT_ROUNDS + 1):
        q = torch.round(rows / scale[:, None]).clamp(-127, 127)
        error = (q * scale[:, None] - rows).pow(2).sum(dim=1)
        better = error < best_error
        best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
        scale = ((q * rows).sum(dim=1) / q.pow(2).sum(dim=1).clamp(min=1)).clamp(min=1e-12)
    return best_scale


def int8_levels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-torch reference of pack.c's int8 packing: levels [N, K] int8 and scales [N] float32."""
    scale = torch.cat([int8_scale(rows) for rows in weight.split(max(1, CHUNK // weight.shape[1]))])
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def pack_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric, one float32 scale per output row: W ~= q * scale, q in -127..127."""
    weight = weight.float().contiguous()
    q, scale = native.pack_int8(weight) if native.available() and weight.shape[1] % 8 == 0 else int8_levels(weight)
    return {"weight": q, "scale": scale}


def round_int4(groups: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels 0..15 for groups [..., 32] with scale and minimum [...], and their squared error."""
    step = torch.where(scale == 0, 1.0, scale)
    q = torch.round((groups - minimum[..., None]) / step[..., None]).clamp(0, 15)
    return q, (q * scale[..., None] + minimum[..., None] - groups).pow(2).sum(dim=-1)


def int4_range(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and minimum [n] for groups [n, 32]: the least squared error reached from RANGE_STARTS. Each
    candidate is tried at float16 precision (far finer than the codes they become): pack.c sums in
    another order, and only so do the two land on the same ranges, bit for bit, and so on the same steps."""
    low, mean = groups.amin(dim=-1), groups.mean(dim=-1)
    span = groups.amax(dim=-1) - low
    best = (span.half().float(), low.half().float(), torch.full_like(span, float("inf")))
    for start_low, start_high in itertools.product(RANGE_STARTS, repeat=2):
        scale, minimum = span * (1 - start_low - start_high) / 15, low + start_low * span
        for _ in range(REFIT_ROUNDS + 1):
            tried = scale.half().float(), minimum.half().float()
            q, error = round_int4(groups, *tried)
            better = error < best[2]
            best = tuple(torch.where(better, new, old) for new, old in zip((*tried, error), best))
            q_mean = q.mean(dim=-1)
            variance = (q - q_mean[..., None]).pow(2).sum(dim=-1)
            covariance = ((q - q_mean[..., None]) * (groups - mean[..., None])).sum(dim=-1)
            scale = torch.where(variance > 0, covariance / variance.clamp(min=1e-12), scale).clamp(min=0)
            minimum = mean - scale * q_mean
    return best[0], best[1]


def int4_codes(scale: torch.Tensor, minimum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's fitted group scales [N, G] and minimums as uint8 and int8 codes on two float32 steps per
    row [N, 2], so that scale ~= code * steps[:, 0] and minimum ~= code * steps[:, 1]."""
    steps = torch.stack([scale.amax(1).clamp(min=1e-12) / 255, minimum.abs().amax(1).clamp(min=1e-12) / 127], dim=1)
    scale_codes = torch.round(scale / steps[:, :1]).clamp(0, 255)
    minimum_codes = torch.round(minimum / steps[:, 1:]).clamp(-127, 127)
    return scale_codes.to(torch.uint8), minimum_codes.to(torch.int8), steps


def int4_levels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pure-torch reference of pack.c's int4 packing: weight [N, K] -> packed bytes [N, K/2], scale
    codes [N, K/32] uint8, minimum codes int8 and steps [N, 2]: each group's best range (int4_range),
    then its codes, then its levels for the coded range."""
    n_out, n_in = weight.shape
    groups = weight.float().reshape(-1, GROUP)
    ranges = [int4_range(chunk) for chunk in groups.split(CHUNK // GROUP)]
    scale, minimum = (torch.cat(parts).view(n_out, -1) for parts in zip(*ranges))
    scale_codes, minimum_codes, steps = int4_codes(scale, minimum)
    coded_scale, coded_minimum = scale_codes.float() * steps[:, :1], minimum_codes.float() * steps[:, 1:]
    q = round_int4(groups, coded_scale.flatten(), coded_minimum.flatten())[0].to(torch.uint8)
    packed = (q[:, : GROUP // 2] | (q[:, GROUP // 2 :] << 4)).view(n_out, n_in // 2)
    return packed, scale_codes, minimum_codes, steps


def pack_int4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Asymmetric groups of 32 along K: W ~= q * scale + minimum, q in 0..15, with each group's scale and
    minimum one byte each on steps kept per row: 4.5 bits a weight, as llama.cpp's q4_0, which has no
    minimum. A float16 scale and minimum per group (5 bits) agreed no better with the float model: top-1
    of the embedded model's int4 decode steps on 4,800 held-out positions 95.15%, the codes 95.19%.

    Byte i of a group holds weight i in its low nibble and weight i + 16 in its high nibble.
    """
    weight = weight.float().contiguous()
    packed, scale, minimum, steps = native.pack_int4(weight) if native.available() else int4_levels(weight)
    return {"weight": packed, "scale": scale, "minimum": minimum, "steps": steps}


def packed_shapes(fmt: str, n_out: int, n_in: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if fmt == "bf16":
        return {"weight": ((n_out, n_in), torch.bfloat16)}
    if fmt == "int8":
        return {"weight": ((n_out, n_in), torch.int8), "scale": ((n_out,), torch.float32)}
    groups = n_in // GROUP
    return {
        "weight": ((n_out, n_in // 2), torch.uint8),
        "scale": ((n_out, groups), torch.uint8),
        "minimum": ((n_out, groups), torch.int8),
        "steps": ((n_out, 2), torch.float32),
    }


class PackedLinear(nn.Module):
    """A bias-free linear layer whose weight is kept as bf16, int8 or int4 and applied to float32 input."""

    def __init__(self, in_features: int, out_features: int, fmt: str, device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % GROUP:
            raise MidfillError(f"packed weights need in_features divisible by {GROUP}, got {in_features}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, check_format(fmt)
        for name, (shape, dtype) in packed_shapes(fmt, out_features, in_features).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))

    @classmethod
    def pack(cls, weight: torch.Tensor, fmt: str) -> "PackedLinear":
        n_out, n_in = weight.shape
        layer = cls(n_in, n_out, fmt, device=weight.device)
        tensors = {"weight": weight.detach().to(torch.bfloat16)} if fmt == "bf16" else {}
        tensors = tensors or (pack_int8 if fmt == "int8" else pack_int4)(weight.detach())
        for name, tensor in tensors.items():
            setattr(layer, name, tensor.contiguous())
        return layer

    def unpack(self) -> torch.Tensor:
        """The float32 weight [out, in] these bytes stand for: the reference for every kernel."""
        if self.fmt == "bf16":
            return self.weight.float()
        if self.fmt == "int8":
            return self.weight.float() * self.scale[:, None]
        low, high = self.weight & 0x0F, self.weight >> 4
        q = torch.cat([low.view(self.out_features, -1, GROUP // 2), high.view(self.out_features, -1, GROUP // 2)], -1)
        scale, minimum = self.scale.float() * self.steps[:, :1], self.minimum.float() * self.steps[:, 1:]
        return (q.float() * scale[..., None] + minimum[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # a prompt's bf16 products (bf16_prompt)
            return self.bf16_product(x)
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return F.linear(x, self.unpack().to(x.dtype))
        rows = x.reshape(-1, self.in_features).contiguous()
        if rows.shape[0] > NATIVE_MAX_ROWS:  # a prompt: arithmetic-bound, see midfill/model/packed_prefill.py
            if self.fmt == "bf16":
                y = bf16_product(rows, self.weight)
            else:
                y = int8_product(rows, *((self.weight, self.scale) if self.fmt == "int8" else int8_rows(self.unpack())))
        elif not native.available():
            y = F.linear(rows, self.unpack())
        elif self.fmt == "bf16":
            y = native.linear_bf16(rows, self.weight)
        elif self.fmt == "int8":
            y = native.linear_int8(rows, self.weight, self.scale)
        else:
            y = native.linear_int4(rows, self.weight, self.scale, self.minimum, self.steps)
        return y.view(*x.shape[:-1], self.out_features)

    def bf16_product(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 x times these weights in bf16: as stored, or int8 levels (exact in bf16) widened for the
        call with the scale applied after, or int4 weights widened and rounded to bf16."""
        if self.fmt == "bf16":
            return F.linear(x, self.weight)
        if native.available():
            y = widened_bf16_product(x, self.fmt, self.weight, self.scale, getattr(self, "minimum", None), getattr(self, "steps", None))
        else:
            y = F.linear(x, (self.weight if self.fmt == "int8" else self.unpack()).to(torch.bfloat16))
        return y.mul_(self.scale.to(torch.bfloat16)) if self.fmt == "int8" else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"


def bf16_prompt(model: nn.Module, rows: int) -> bool:
    """Whether a forward over `rows` token rows runs its products and attention in bf16, keeping the
    residual stream, norms and KV cache float32: a prompt on packed weights where the CPU has bf16
    matrix units (int8/int4 layers are widened to bf16 for the product). Converting each product's
    input and output between float32 and bf16 and attending in float32 took half of a 512-token
    prompt's time beside the products themselves."""
    return (model.weight_format is not None and model.device.type == "cpu" and model.dtype == torch.float32
            and rows > NATIVE_MAX_ROWS and has_bf16_matrix_units())  # fmt: skip


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(full name, parent, attribute, layer) for every linear layer of the network, lm_head included."""
    return [
        (f"{prefix}.{name}".lstrip("."), parent, name, child)
        for prefix, parent in model.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, (nn.Linear, PackedLinear))
    ]


def layer_format(fmt: str, name: str) -> str:
    return next((wider for pattern, wider in WIDER_LAYERS[fmt].items() if re.fullmatch(pattern, name)), fmt)


def quantize_model(model: nn.Module, fmt: str) -> nn.Module:
    """Store the linear weights of a float model in `fmt` (a few layers wider), in place; the norms become
    float32 and the embedding keeps its precision (its rows are widened as they are gathered)."""
    check_format(fmt)
    if model.weight_format is not None:
        if model.weight_format == fmt:
            return model
        raise MidfillError(
            f"the model's weights are already stored as {model.weight_format}; load the original float checkpoint to get {fmt}"
        )
    layers = linear_layers(model)
    kept = {id(layer.weight) for *_, layer in layers} | {id(model.transformer.wte.weight)}
    for param in model.parameters():  # not model.float(): that would widen the packed bf16 buffers and int4 steps too
        if id(param) not in kept:
            param.data = param.data.float()
    for name, parent, attribute, layer in layers:
        setattr(parent, attribute, PackedLinear.pack(layer.weight, layer_format(fmt, name)))
    model.weight_format = fmt
    place_on_huge_pages(model)
    return model


def place_on_huge_pages(model: nn.Module) -> None:
    """Lay the packed CPU weights end to end, in the order a token reads them, on 2 MiB pages.

    Decoding streams them all once a token, faster from huge pages (midfill/kernels/huge_pages.py).
    """
    buffers = [(layer, name) for *_, layer in linear_layers(model) if isinstance(layer, PackedLinear)
               for name, buffer in layer.named_buffers() if buffer.device.type == "cpu"]  # fmt: skip
    if buffers:
        move_to_huge_pages(buffers)


def empty_packed(model: nn.Module, fmt: str) -> nn.Module:
    """Swap the linear layers of a (meta) model for empty packed ones, ready to receive a packed state dict."""
    check_format(fmt)
    for name, parent, attribute, layer in linear_layers(model):
        packed = PackedLinear(layer.in_features, layer.out_features, layer_format(fmt, name), device=layer.weight.device)
        setattr(parent, attribute, packed)
    model.weight_format = fmt
    return model


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads: every linear layer and norm, plus one embedding row."""
    linear = sum(t.numel() * t.element_size() for *_, layer in linear_layers(model) for t in [*layer.buffers(), *layer.parameters()])
    norms = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".ln" in f".{name}")
    embedding = model.transformer.wte.weight
    return linear + norms + embedding.shape[1] * embedding.element_size()
