"""Token shards: flat binary files of token ids (uint16 when the vocabulary fits), read as memmaps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from midfill.errors import MidfillError
from midfill.files import write_text_atomic

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents' token ids to numbered shards of at most `shard_tokens` tokens.

    A shard is written under a temporary name and renamed when full, so a killed build never
    leaves a truncated shard behind.
    """

    def __init__(self, folder: Path, name: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.name, self.dtype, self.shard_tokens = folder, name, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._tokens = 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._tokens
            self._file.write(ids[:room].tobytes())
            self._tokens += min(room, len(ids))
            ids = ids[room:]
            if self._tokens >= self.shard_tokens:
                self._close_shard()

    def close(self) -> list[dict]:
        if self._file is not None:
            self._close_shard()
        return self.shards

    def _open(self) -> None:
        final = self.folder / f"{self.name}-{len(self.shards):05d}.bin"
        self._final = final
        self._file = open(final.with_suffix(".tmp"), "wb")
        self._tokens = 0

    def _close_shard(self) -> None:
        self._file.close()
        os.replace(self._final.with_suffix(".tmp"), self._final)
        self.shards.append({"file": self._final.name, "tokens": self._tokens})
        self._file = None


def write_manifest(folder: Path, manifest: dict) -> None:
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise MidfillError(f"{path}: no manifest; build the data first with `midfill data build ... --out {folder}`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MidfillError(f"{path}: not valid JSON ({exc})") from None


class TokenShards:
    """One split's shards as a single read-only sequence of token ids (memory-mapped).

    Shards of ready-made examples (the finetune mix) carry a parallel mask: 1 where the token is a
    training target. Plain documents have none; FIM is applied to them at training time.
    """

    def __init__(self, folder: str | Path, split: str = "train") -> None:
        folder = Path(folder)
        manifest = read_manifest(folder)
        self.eot_id = manifest["eot_id"]
        dtype = np.dtype(manifest["dtype"])
        shards = [s for s in manifest["splits"][split] if s["tokens"]]
        if not shards:
            raise MidfillError(f"{folder}: the {split} split has no tokens; add more data or lower --val-fraction")
        self.arrays = [np.memmap(folder / s["file"], dtype=dtype, mode="r") for s in shards]
        self.masks = [np.memmap(folder / s["mask"], dtype=np.uint8, mode="r") for s in shards] if "mask" in shards[0] else None
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens start..start+length-1, across shard boundaries."""
        return self._slice(self.arrays, start, length)

    def mask_window(self, start: int, length: int) -> np.ndarray:
        assert self.masks is not None, "these shards hold plain documents, without target masks"
        return self._slice(self.masks, start, length).astype(bool)

    def _slice(self, arrays: list[np.ndarray], start: int, length: int) -> np.ndarray:
        out, position = [], start
        while length > 0:
            shard = int(np.searchsorted(self.offsets, position, side="right")) - 1
            local = position - int(self.offsets[shard])
            piece = arrays[shard][local : local + length]
            out.append(np.asarray(piece, dtype=np.int64))
            length -= len(piece)
            position += len(piece)
        return np.concatenate(out)
