"""The model configuration, read from and written to Hugging Face's `config.json` layout."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from midfill.errors import MidfillError
from midfill.files import write_text_atomic

MODEL_TYPE = "gpt_refact"
ARCHITECTURE = "GPTRefactForCausalLM"


@dataclass
class RefactConfig:
    """Every key of Refact-1.6B's `config.json`; sizes default to the real 1.6B model."""

    vocab_size: int = 49216
    n_embd: int = 2048
    n_layer: int = 32
    n_head: int = 32
    n_positions: int = 4096
    n_inner: int | None = None
    multi_query: bool = True
    layer_norm_epsilon: float = 1e-5
    attention_softmax_in_fp32: bool = True
    scale_attention_softmax_in_fp32: bool = True
    attention_bias_in_fp32: bool = True
    initializer_range: float = 0.02
    eos_token_id: int = 0
    do_sample: bool = True
    use_cache: bool = True
    torch_dtype: str = "bfloat16"
    transformers_version: str = "4.31.0"
    model_type: str = MODEL_TYPE
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE])
    midfill_weight_format: str | None = None  # bf16/int8/int4 for checkpoints packed by `midfill quantize`
    auto_map: dict[str, str] = field(
        default_factory=lambda: {
            "AutoConfig": "configuration_gpt_refact.GPTRefactConfig",
            "AutoModelForCausalLM": "modeling_gpt_refact.GPTRefactForCausalLM",
        }
    )

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise MidfillError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not self.multi_query:
            raise MidfillError("multi_query=false is not a Refact model: only one K/V head is supported")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU width as the reference derives it: 2/3 of n_inner (default 4*n_embd), rounded up to 256."""
        inner = self.n_inner if self.n_inner is not None else 4 * self.n_embd
        multiple_of = 256
        hidden = int(2 * inner / 3)
        return multiple_of * ((hidden + multiple_of - 1) // multiple_of)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "RefactConfig":
        model_type = raw.get("model_type")
        if model_type != MODEL_TYPE:
            raise MidfillError(
                f"{source}: model_type is {model_type!r}, but midfill runs only {MODEL_TYPE!r} "
                f"({ARCHITECTURE}) checkpoints"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise MidfillError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "RefactConfig":
        path = Path(path)
        if not path.is_file():
            raise MidfillError(f"{path}: config.json is missing; a model folder needs config.json next to its weights")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MidfillError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise MidfillError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The config.json keys; a float checkpoint's stay exactly the reference's."""
        raw = dataclasses.asdict(self)
        if raw["midfill_weight_format"] is None:
            del raw["midfill_weight_format"]
        return raw

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
