"""Training configuration: one TOML or YAML file, with model-shape presets from tiny to the real 1.6B."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from midfill.data.fim import FimConfig
from midfill.errors import MidfillError

# n_embd, n_layer, n_head, n_positions
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "small": dict(n_embd=256, n_layer=4, n_head=4, n_positions=1024),
    "base": dict(n_embd=512, n_layer=8, n_head=8, n_positions=2048),
    "medium": dict(n_embd=1024, n_layer=16, n_head=16, n_positions=4096),
    "refact-1.6b": dict(n_embd=2048, n_layer=32, n_head=32, n_positions=4096),
}


@dataclass
class LoopConfig:
    """How the training loop optimises, whatever it trains: schedule, batch, evaluation, checkpoints."""

    seed: int = 0
    steps: int = 1000
    micro_batch: int = 8  # sequences per process per micro-step
    grad_accum: int = 1
    block_size: int = 256
    optimizer: str = "lion"  # or "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    # autocast dtype for forward passes; "auto" is bfloat16 on a GPU, and on a CPU whichever of float32
    # and bf16 trains this model faster when timed at start-up (midfill.train.hardware.survey)
    dtype: str = "auto"
    compile: bool | str = "auto"  # torch.compile each block's attention and MLP; "auto": on a GPU only
    attention: str = "auto"  # "sdpa" (a bias tensor), "flex" (FlexAttention, GPU only), "auto": flex on a GPU
    early_dropout: float = 0.1  # dropout at step 0 ...
    early_dropout_fraction: float = 0.1  # ... decaying linearly to 0 over this fraction of the steps, then off
    eval_every: int = 100
    checkpoint_every: int = 100
    patience: int = 0  # evaluations without a better held-out loss before stopping early; 0: never stop early
    parallel: str = "ddp"  # under torchrun: "ddp", or "fsdp" for models that do not fit one GPU

    def __post_init__(self) -> None:
        if self.optimizer not in ("lion", "adamw"):
            raise MidfillError(f"unknown optimizer {self.optimizer!r}; use lion or adamw")
        if self.parallel not in ("ddp", "fsdp"):
            raise MidfillError(f"unknown parallel mode {self.parallel!r}; use ddp or fsdp")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise MidfillError(f"unknown dtype {self.dtype!r}; use auto, float32, bfloat16 or float16")
        if self.compile not in ("auto", True, False):
            raise MidfillError(f"compile must be true, false or \"auto\", got {self.compile!r}")
        if self.attention not in ("auto", "sdpa", "flex"):
            raise MidfillError(f"unknown attention {self.attention!r}; use auto, sdpa or flex")
        for name in ("steps", "micro_batch", "grad_accum", "block_size"):
            if getattr(self, name) < 1:
                raise MidfillError(f"{name} must be at least 1")
        if not 0 <= self.early_dropout < 1 or not 0 <= self.early_dropout_fraction <= 1:
            raise MidfillError("early_dropout must be in [0, 1) and early_dropout_fraction in [0, 1]")
        self.betas = tuple(self.betas)  # type: ignore[assignment]


@dataclass(kw_only=True)
class TrainConfig(LoopConfig):
    """A pretraining (or full finetuning) run: the loop's settings, the model's shape and the packed data."""

    data: str  # a folder made by `midfill data build`
    out_dir: str
    preset: str = "tiny"
    model: dict[str, int] = field(default_factory=dict)  # overrides of the preset's shape
    init_from: str | None = None  # a model folder whose weights start the run (a finetune)
    eval_batches: int = 4
    fim: FimConfig = field(default_factory=FimConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset not in PRESETS:
            raise MidfillError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if isinstance(self.fim, dict):
            self.fim = FimConfig(**self.fim)

    def shape(self) -> dict[str, int]:
        shape = {**PRESETS[self.preset], **self.model}
        if self.block_size > shape["n_positions"]:
            raise MidfillError(f"block_size {self.block_size} is longer than the model's context of {shape['n_positions']}")
        return shape

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise MidfillError(f"{source}: unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise MidfillError(f"{source}: {exc}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML (.toml) or YAML (.yaml/.yml) training config; relative paths are from the file."""
    path = Path(path)
    if not path.is_file():
        raise MidfillError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml  # only needed for YAML configs

            raw = yaml.safe_load(text) or {}
        else:
            raise MidfillError(f"{path}: config must be .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise MidfillError(f"{path}: cannot parse it ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise MidfillError(f"{path}: expected a table of settings")
    raw = {**raw, **(overrides or {})}
    for key in ("data", "out_dir"):
        if key in raw and not Path(raw[key]).is_absolute():
            raw[key] = str((path.parent / raw[key]).resolve())
    return TrainConfig.from_dict(raw, source=str(path))
