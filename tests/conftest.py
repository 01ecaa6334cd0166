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


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real standard-library modules plus the kinds of junk a crawl brings in."""
    import sysconfig

    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "keyword.py", "fnmatch.py", "shlex.py", "glob.py"):
        (folder / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "copy_of_glob.py").write_text((stdlib / "glob.py").read_text(encoding="utf-8"))  # exact copy
    near = (stdlib / "shlex.py").read_text(encoding="utf-8").replace("posix", "posix_mode")
    (folder / "shlex_renamed.py").write_text(near)  # near copy: 5-gram Jaccard 0.89 with shlex.py
    (folder / "bundle.min.js").write_text("var a=" + ",".join(str(i) for i in range(2000)) + ";")
    (folder / "LIESMICH.md").write_text(
        "# Werkzeuge\n\nDieses Projekt sammelt kleine Werkzeuge für den Alltag. Laden Sie das Archiv herunter und "
        "starten Sie das Programm. Bei Fragen schreiben Sie uns gerne eine Nachricht.\n"
    )
    (folder / "README.md").write_text(
        "# corpus\n\nA few Python modules for testing the data pipeline: install the package with pip, import the "
        "module and call its functions; the test suite runs with pytest on every commit.\n"
    )
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    (folder / "notes.txt").write_bytes(b"\x00\x01binary blob committed as text" * 20)
    return folder


@pytest.fixture(scope="session")
def built_data(tmp_path_factory: pytest.TempPathFactory, code_corpus: Path, small_tokenizer: Tokenizer) -> Path:
    from midfill.data.build import BuildConfig, build_dataset

    folder = tmp_path_factory.mktemp("built")
    tokenizer_path = folder.parent / "built_tokenizer.json"
    small_tokenizer.save(tokenizer_path)
    build_dataset([str(code_corpus)], folder, tokenizer_path, BuildConfig(workers=2, chunk_docs=4, val_fraction=0.2))
    return folder
