"""Shared fixtures: the golden vectors in ../shared (skipped when absent) and tiny local models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from midfill.model.checkpoint import save_model
from midfill.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from tests.helpers import stdlib_texts, tiny_model

# ../shared/golden beside the checkout, or wherever MIDFILL_GOLDEN points.
SHARED = Path(os.environ.get("MIDFILL_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))
GOLDEN_MODEL = SHARED / "refact_tiny"
GOLDEN_TOKENIZER = SHARED / "refact_tokenizer"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"golden data not found at {path} (the ../shared checkout is absent)")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require(GOLDEN_MODEL)


@pytest.fixture(scope="session")
def golden_expected(golden_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(golden_dir / "expected.safetensors")


@pytest.fixture(scope="session")
def refact_tokenizer() -> Tokenizer:
    return load_tokenizer(require(GOLDEN_TOKENIZER / "tokenizer.json"))


@pytest.fixture(scope="session")
def tokenizer_examples() -> list[dict]:
    return json.loads(require(GOLDEN_TOKENIZER / "examples.json").read_text())["examples"]


@pytest.fixture(scope="session")
def small_tokenizer() -> Tokenizer:
    return train_tokenizer(stdlib_texts(), vocab_size=480)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> Path:
    """A complete model folder (config.json, model.safetensors, tokenizer.json) with random weights."""
    folder = tmp_path_factory.mktemp("tiny_model")
    save_model(tiny_model(), folder)
    small_tokenizer.save(folder / "tokenizer.json")
    return folder
