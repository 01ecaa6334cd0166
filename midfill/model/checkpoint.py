"""Checkpoints: loading local folders in every layout this architecture has shipped in, or hub ids.

Alternative layouts are adapted here, at the edge, so the network only knows one set of names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from midfill.errors import MidfillError
from midfill.files import atomic_path
from midfill.hub import resolve_model_dir
from midfill.model.alibi import alibi_slopes
from midfill.model.config import RefactConfig
from midfill.model.quantize import PackedLinear, check_format, empty_packed, place_on_huge_pages, quantize_model
from midfill.model.refact import GPTRefactForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise MidfillError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise MidfillError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MidfillError(f"device {name!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    return device


def read_safetensors(path: Path, dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name).to(device=device, dtype=dtype or None) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise MidfillError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})") from None


def read_torch_bin(path: Path, dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch.load wraps unpickling, zip and I/O failures in several types
        raise MidfillError(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise MidfillError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return {name: t.to(device=device, dtype=dtype or None) for name, t in state.items() if isinstance(t, torch.Tensor)}


def read_sharded(index_path: Path, reader, dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise MidfillError(f"{index_path}: not a valid shard index, expected a 'weight_map' ({exc})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise MidfillError(f"{shard_path}: shard listed in {index_path.name} is missing")
        state.update(reader(shard_path, dtype, device))
    return state


def read_weights(folder: Path, dtype: torch.dtype | None, device: torch.device) -> tuple[dict[str, torch.Tensor], Path]:
    """The raw state dict from whichever weight files the folder has (in `dtype`, or as stored when None)."""
    candidates = [
        ("model.safetensors", read_safetensors, False),
        ("model.safetensors.index.json", read_safetensors, True),
        ("pytorch_model.bin", read_torch_bin, False),
        ("pytorch_model.bin.index.json", read_torch_bin, True),
    ]
    for name, reader, sharded in candidates:
        path = folder / name
        if path.is_file():
            state = read_sharded(path, reader, dtype, device) if sharded else reader(path, dtype, device)
            return state, path
    raise MidfillError(
        f"{folder}: no weights found; expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def adapt_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and fuse tensors of older layouts into the released one.

    The early-2023 code kept separate `attn.k`/`attn.v` (fused here as kv = [k; v]) and
    `mlp.linear_1`/`mlp.linear_3` (gate and up, fused as gate_up_proj = [gate; up]).
    """
    state = {name.removeprefix("module."): t for name, t in state.items()}
    fusions = [("attn.k.weight", "attn.v.weight", "attn.kv.weight"),
               ("mlp.linear_1.weight", "mlp.linear_3.weight", "mlp.gate_up_proj.weight")]
    for first, second, fused in fusions:
        for name in [n for n in state if n.endswith("." + first)]:
            stem = name[: -len(first)]
            if stem + second in state:
                state[stem + fused] = torch.cat([state.pop(name), state.pop(stem + second)], dim=0)
    return state


def check_state(state: dict[str, torch.Tensor], model: GPTRefactForCausalLM, source: Path) -> None:
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MidfillError(f"{source}: tensor {missing[0]}{more} missing; is this a {model.config.model_type} checkpoint?")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise MidfillError(f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all) for this architecture")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise MidfillError(
                f"{source}: tensor {name} has shape {tuple(state[name].shape)} but config.json implies {shape}"
            )


def load_model(
    path_or_id: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> GPTRefactForCausalLM:
    """Load a GPTRefact checkpoint from a folder or hub id, in eval mode, on `device` in `dtype`.

    With `quantize` (bf16, int8 or int4) the linear weights are packed as they load and everything
    else runs in float32; a checkpoint saved packed loads packed, without quantizing again.
    """
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    folder = resolve_model_dir(path_or_id)
    config = RefactConfig.from_file(folder / "config.json")
    stored = config.midfill_weight_format
    if stored is not None and quantize not in (None, stored):
        raise MidfillError(
            f"{folder} is stored as {stored}; it cannot become {quantize}. Quantize the original float checkpoint instead"
        )
    fmt = stored or quantize
    if fmt is not None:
        check_format(fmt)
    state, source = read_weights(folder, torch_dtype if fmt is None else None, torch_device)
    state = adapt_layout(state)
    with torch.device("meta"):
        model = GPTRefactForCausalLM(config)
        if stored is not None:
            empty_packed(model, stored)
    check_state(state, model, source)
    if stored is not None:  # packed tensors keep their own dtypes; the rest runs in float32
        packed = {f"{prefix}.{name}" for prefix, layer in model.named_modules() if isinstance(layer, PackedLinear)
                  for name, _ in layer.named_buffers()}
        state = {name: t if name in packed else t.float() for name, t in state.items()}
    model.load_state_dict(state, assign=True)
    if stored is not None:
        place_on_huge_pages(model)
    elif quantize is not None:
        quantize_model(model, quantize)
    model.alibi_slopes = alibi_slopes(config.n_head).to(torch_device)
    model.source = str(folder)
    return model.eval()


def save_model(model: GPTRefactForCausalLM, folder: str | os.PathLike) -> Path:
    """Write config.json and model.safetensors (released layout) atomically; return the folder."""
    folder = Path(folder)
    config = dataclasses.replace(
        model.config, torch_dtype=str(model.dtype).removeprefix("torch."), midfill_weight_format=model.weight_format
    )
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config.save(folder / "config.json")
    return folder
