"""Checkpoints: loading local folders in every layout this architecture has shipped in, or hub ids.

Alternative layouts are adapted here, at the edge, so the network only knows one set of names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from midfill.errors import MidfillError
from midfill.files import atomic_path
from midfill.hub import resolve_model_dir
from midfill.kernels.huge_pages import huge_page_views, read_ahead
from midfill.model.alibi import alibi_slopes
from midfill.model.config import RefactConfig
from midfill.model.precision import Precision, choose_precision, parse_dtype
from midfill.model.quantize import PackedLinear, check_format, empty_packed, linear_layers
from midfill.model.refact import GPTRefactForCausalLM


class SkippedInit(TorchFunctionMode):
    """Skips torch.nn.init calls while a network that is about to be given its weights is built. On the
    meta device nn.Embedding's normal_ runs through torch._refs, which imports torch._dynamo and sympy:
    ~70 MB resident for the life of a server, and a second of loading, to initialize nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]  # every init function's first parameter
        return func(*args, **(kwargs or {}))


def parse_device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise MidfillError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MidfillError(f"device {name!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    return device


@dataclass(frozen=True)
class StoredTensor:
    """A tensor still on disk: its shape and dtype now, its values when read.

    Loading reads one tensor at a time into its final place, so the peak is the model plus one
    tensor, never a second whole copy (a whole file mapped at once would count fully in RSS).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                      "BOOL": torch.bool}  # fmt: skip


def unreadable(path: Path, exc: Exception) -> MidfillError:
    return MidfillError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})")


def read_safetensors(path: Path) -> dict[str, StoredTensor]:
    """The file's tensors, each opened on its own when read, so only that tensor's pages are mapped."""

    def reader(name: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    return f.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise unreadable(path, exc) from None

        return read

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            headers = {name: f.get_slice(name) for name in f.keys()}
            layout = {name: (tuple(h.get_shape()), h.get_dtype()) for name, h in headers.items()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise unreadable(path, exc) from None
    unknown = sorted({dtype for _, dtype in layout.values()} - set(SAFETENSORS_DTYPES))
    if unknown:
        raise MidfillError(f"{path}: tensors of dtype {unknown[0]}, which midfill does not load")
    return {name: StoredTensor(shape, SAFETENSORS_DTYPES[dtype], reader(name)) for name, (shape, dtype) in layout.items()}


def read_torch_bin(path: Path) -> dict[str, StoredTensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch.load wraps unpickling, zip and I/O failures in several types
        raise MidfillError(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise MidfillError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return {name: StoredTensor(tuple(t.shape), t.dtype, lambda t=t: t) for name, t in state.items() if isinstance(t, torch.Tensor)}


def read_sharded(index_path: Path, reader) -> dict[str, StoredTensor]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise MidfillError(f"{index_path}: not a valid shard index, expected a 'weight_map' ({exc})") from None
    state: dict[str, StoredTensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise MidfillError(f"{shard_path}: shard listed in {index_path.name} is missing")
        state.update(reader(shard_path))
    return state


def read_weights(folder: Path) -> tuple[dict[str, StoredTensor], Path]:
    """The stored tensors of whichever weight files the folder has, not yet read."""
    candidates = [
        ("model.safetensors", read_safetensors, False),
        ("model.safetensors.index.json", read_safetensors, True),
        ("pytorch_model.bin", read_torch_bin, False),
        ("pytorch_model.bin.index.json", read_torch_bin, True),
    ]
    for name, reader, sharded in candidates:
        path = folder / name
        if path.is_file():
            return (read_sharded(path, reader) if sharded else reader(path)), path
    raise MidfillError(
        f"{folder}: no weights found; expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def fused(first: StoredTensor, second: StoredTensor) -> StoredTensor:
    shape = (first.shape[0] + second.shape[0], *first.shape[1:])
    return StoredTensor(shape, first.dtype, lambda: torch.cat([first.read(), second.read()], dim=0))


def adapt_layout(state: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """Rename and fuse tensors of older layouts into the released one.

    The early-2023 code kept separate `attn.k`/`attn.v` (fused here as kv = [k; v]) and
    `mlp.linear_1`/`mlp.linear_3` (gate and up, fused as gate_up_proj = [gate; up]).
    """
    state = {name.removeprefix("module."): t for name, t in state.items()}
    fusions = [("attn.k.weight", "attn.v.weight", "attn.kv.weight"),
               ("mlp.linear_1.weight", "mlp.linear_3.weight", "mlp.gate_up_proj.weight")]
    for first, second, fused_name in fusions:
        for name in [n for n in state if n.endswith("." + first)]:
            stem = name[: -len(first)]
            if stem + second in state:
                state[stem + fused_name] = fused(state.pop(name), state.pop(stem + second))
    return state


def check_state(state: dict[str, StoredTensor], model: GPTRefactForCausalLM, source: Path) -> None:
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


def check_packed_layout(state: dict[str, StoredTensor], model: GPTRefactForCausalLM, source: Path) -> None:
    """A checkpoint packed by `midfill quantize` holds this version's packed tensors, dtype for dtype
    (the int4 layout changed: float16 scales and minimums became byte codes on per-row steps)."""
    for prefix, _, _, layer in linear_layers(model):
        for name, buffer in layer.named_buffers():
            stored = state.get(f"{prefix}.{name}")
            if stored is None or stored.dtype != buffer.dtype:
                found = "missing" if stored is None else f"stored as {str(stored.dtype).removeprefix('torch.')}"
                raise MidfillError(
                    f"{source}: {prefix}.{name} is {found}; this midfill packs {layer.fmt} layers otherwise. "
                    "Pack the original checkpoint again with `midfill quantize`"
                )


def stored_dtype(path_or_id: str | os.PathLike) -> torch.dtype:
    """The dtype a checkpoint's weights are saved in (its head's), from the file headers alone."""
    return adapt_layout(read_weights(resolve_model_dir(path_or_id))[0])["lm_head.weight"].dtype


def load_model(
    path_or_id: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> GPTRefactForCausalLM:
    """Load a GPTRefact checkpoint from a folder or hub id, in eval mode, on `device`.

    dtype "auto" keeps the checkpoint's own precision (midfill.model.precision: a bf16 checkpoint on
    a CPU runs packed bf16); a dtype asks for that one. With `quantize` (bf16, int8 or int4) the
    linear weights are packed as they load; a checkpoint saved packed loads packed, without
    quantizing again. `model.precision` says which and why.
    """
    torch_device = parse_device(device)
    if dtype != "auto":
        parse_dtype(dtype)
    folder = resolve_model_dir(path_or_id)
    config = RefactConfig.from_file(folder / "config.json")
    stored = config.midfill_weight_format
    if stored is not None and quantize not in (None, stored):
        raise MidfillError(
            f"{folder} is stored as {stored}; it cannot become {quantize}. Quantize the original float checkpoint instead"
        )
    if quantize is not None:
        check_format(quantize)
    tensors, source = read_weights(folder)
    tensors = adapt_layout(tensors)
    with torch.device("meta"), SkippedInit():
        model = GPTRefactForCausalLM(config)
    if stored is not None:
        empty_packed(model, stored)
        check_packed_layout(tensors, model, source)
        precision = Precision(torch.float32, stored, f"the checkpoint was packed as {stored} by `midfill quantize`")
    check_state(tensors, model, source)
    if stored is None:
        precision = choose_precision(tensors["lm_head.weight"].dtype, dtype, quantize, torch_device)
        if precision.packed is not None:
            empty_packed(model, precision.packed)
    model.load_state_dict(materialize(model, tensors, precision, torch_device), assign=True)
    model.alibi_slopes = alibi_slopes(config.n_head).to(torch_device)
    model.source, model.precision = str(folder), precision
    return model.eval()


def materialize(
    model: GPTRefactForCausalLM, tensors: dict[str, StoredTensor], precision: Precision, device: torch.device
) -> dict[str, torch.Tensor]:
    """The state dict, read one stored tensor at a time straight into its place.

    Packed weights land end to end on huge pages (what a decoded token streams), each layer packed as
    it is read; the embedding keeps the checkpoint's float precision under packed weights (a
    prompt's rows are widened as they are gathered); the rest takes precision.dtype.
    """
    packed = [(prefix, layer) for prefix, _, _, layer in linear_layers(model) if isinstance(layer, PackedLinear)]
    specs = [(tuple(buffer.shape), buffer.dtype) for _, layer in packed for buffer in layer.buffers()]
    places = iter(huge_page_views(specs) if device.type == "cpu" else [torch.empty(s, dtype=d, device=device) for s, d in specs])
    state: dict[str, torch.Tensor] = {}
    for prefix, layer in packed:
        names = [name for name, _ in layer.named_buffers()]
        if model.config.midfill_weight_format is not None:
            values = {name: tensors.pop(f"{prefix}.{name}").read() for name in names}
        else:
            values = dict(PackedLinear.pack(tensors.pop(f"{prefix}.weight").read(), layer.fmt).named_buffers())
        for name in names:
            state[f"{prefix}.{name}"] = next(places).copy_(values.pop(name))
    for name, stored in tensors.items():
        keep = name == "transformer.wte.weight" and precision.packed is not None and stored.dtype.is_floating_point
        # the rest copied, not left as views of the file: each view keeps a mapping of its own, where a page
        # fault maps the 64 KB around it (the 1.6B model's 65 norms held 15 MB resident for 0.5 MB of values)
        state[name] = stored.read().to(device=device, dtype=stored.dtype if keep else precision.dtype, copy=not keep)
        if keep:
            read_ahead(state[name])
    return state


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
