"""LoRA adapters for the Refact network: low-rank updates on chosen linear layers, saved apart, merged for serving.

A small module rather than peft: peft's LoRA needs transformers and accelerate installed for what
is here about a hundred lines, and the adapter files stay midfill's own simple safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from midfill.errors import MidfillError
from midfill.files import atomic_path, write_text_atomic

TARGETS = ("attn.q", "attn.kv", "attn.c_proj", "mlp.gate_up_proj", "mlp.c_proj")
ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.01
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.r < 1:
            raise MidfillError(f"LoRA rank must be at least 1, got {self.r}")
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise MidfillError(f"unknown LoRA target {sorted(unknown)[0]!r}; choose from {', '.join(TARGETS)}")


class LoraLinear(nn.Module):
    """base(x) + B(A(dropout(x))) * alpha/r, with B starting at zero so the adapter starts as a no-op."""

    def __init__(self, base: nn.Linear, config: LoraConfig) -> None:
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(config.r, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, config.r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x).to(self.lora_a.dtype) @ self.lora_a.T @ self.lora_b.T
        return self.base(x) + (update * self.scaling).to(x.dtype)

    def delta(self) -> torch.Tensor:
        """The dense weight update [out, in] this adapter stands for."""
        return (self.lora_b @ self.lora_a) * self.scaling


def target_layers(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(full name, parent, attribute) of every layer the targets name, in every block."""
    found = []
    for name, module in model.named_modules():
        for target in targets:
            parent_name, _, attribute = target.rpartition(".")
            if name.endswith("." + parent_name) or name == parent_name:
                if isinstance(getattr(module, attribute, None), (nn.Linear, LoraLinear)):
                    found.append((f"{name}.{attribute}", module, attribute))
    return found


def add_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap the target layers in adapters (float32 adapter weights) and freeze everything else."""
    if getattr(model, "weight_format", None) is not None:
        raise MidfillError("LoRA trains on a float checkpoint; this model's weights are packed. Load the original model")
    for param in model.parameters():
        param.requires_grad_(False)
    names = []
    for name, parent, attribute in target_layers(model, config.targets):
        layer = getattr(parent, attribute)
        if isinstance(layer, LoraLinear):
            raise MidfillError(f"{name} already has a LoRA adapter")
        setattr(parent, attribute, LoraLinear(layer, config))
        names.append(name)
    if not names:
        raise MidfillError(f"no layer matches the LoRA targets {', '.join(config.targets)}")
    return names


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{part}": getattr(layer, part).detach().float().cpu().contiguous()
        for name, layer in lora_layers(model).items()
        for part in ("lora_a", "lora_b")
    }


def save_adapter(model: nn.Module, config: LoraConfig, folder: Path, metadata: dict | None = None) -> Path:
    """adapter.safetensors and adapter_config.json, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / ADAPTER_FILE) as tmp:
        save_file(adapter_state(model), str(tmp))
    write_text_atomic(folder / CONFIG_FILE, json.dumps({**dataclasses.asdict(config), **(metadata or {})}, indent=2) + "\n")
    return folder


def read_adapter(folder: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / ADAPTER_FILE).is_file():
        raise MidfillError(f"{folder}: not a LoRA adapter folder (expected {CONFIG_FILE} and {ADAPTER_FILE})")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        config = LoraConfig(**{f.name: raw[f.name] for f in dataclasses.fields(LoraConfig) if f.name in raw})
        state = load_file(str(folder / ADAPTER_FILE))
    except (json.JSONDecodeError, TypeError, SafetensorError, OSError) as exc:
        raise MidfillError(f"{folder}: unreadable adapter ({exc})") from None
    return config, state


def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Add adapters to `model` and load their weights from `folder`."""
    config, state = read_adapter(folder)
    add_lora(model, config)
    expected = {name: tuple(t.shape) for name, t in adapter_state(model).items()}
    if set(state) != set(expected) or any(tuple(state[n].shape) != s for n, s in expected.items()):
        raise MidfillError(f"{folder}: this adapter was trained for a model of another shape")
    for name, layer in lora_layers(model).items():
        layer.lora_a.data.copy_(state[f"{name}.lora_a"])
        layer.lora_b.data.copy_(state[f"{name}.lora_b"])
    return config


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the wrappers: same outputs, no extra cost."""
    for name, layer in lora_layers(model).items():
        parent_name, _, attribute = name.rpartition(".")
        base = layer.base
        base.weight.copy_((base.weight.float() + layer.delta().to(base.weight.device)).to(base.weight.dtype))
        setattr(model.get_submodule(parent_name), attribute, base)
    return model
