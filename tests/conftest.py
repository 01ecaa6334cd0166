"""Shared fixtures: the golden vectors in ../shared (skipped when absent) and tiny local models."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from midfill.model.checkpoint import save_model
from midfill.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from tests.helpers import stdlib_texts, tiny_model

def find_golden() -> Path:
    """$MIDFILL_GOLDEN, else ../shared/golden beside this checkout or beside the one it was cloned from."""
    if "MIDFILL_GOLDEN" in os.environ:
        return Path(os.environ["MIDFILL_GOLDEN"])
    repo = Path(__file__).resolve().parents[1]
    candidates = [repo.parent / "shared" / "golden"]
    origin = subprocess.run(["git", "-C", str(repo), "config", "--get", "remote.origin.url"], capture_output=True, text=True)
    if origin.returncode == 0 and origin.stdout.strip() and "://" not in origin.stdout:
        candidates.append(Path(origin.stdout.strip()).parent / "shared" / "golden")
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHARED = find_golden()
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
