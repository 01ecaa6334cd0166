"""Where model folders come from: a local path, or a hub id downloaded through huggingface_hub."""

from __future__ import annotations

import os
import re
from pathlib import Path

from midfill.errors import MidfillError

EMBEDDED_MODEL = Path(__file__).parent / "assets" / "embedded"  # shipped with the package
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Safetensors first; the pickled weights only for a repository that has nothing else.
HUB_FILES = ["config.json", "tokenizer.json", "*.md", "*.safetensors", "model.safetensors.index.json"]
HUB_FALLBACK_FILES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; a hub id ("owner/name") downloaded through huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MidfillError(f"{path}: is a file; --model expects a model folder (config.json + weights) or a hub id")
    text = str(path_or_id)
    if not HUB_ID.fullmatch(text):
        raise MidfillError(f"{text}: no such model folder (and it is not a hub id like 'owner/name')")
    return download_from_hub(text)


def download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # imported here: it is slow and rarely needed

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FALLBACK_FILES))
        return folder
    except Exception as exc:  # the hub client raises many types for "offline", "not found", "denied"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MidfillError(
            f"{repo_id}: not a local folder, and downloading it from the Hugging Face hub failed ({reason}); "
            f"without network, download it elsewhere and pass its folder: --model /path/to/folder"
        ) from None
