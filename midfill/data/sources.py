"""Reading documents from folders, git repositories (tracked files) and JSONL/Parquet shards.

Everything streams: documents are yielded one at a time, so a corpus larger than memory works.
Shards follow The Stack's layout: `content`, `path`, `lang` and `license` columns (also
`max_stars_repo_path` / `max_stars_repo_licenses` as The Stack names them).
"""

from __future__ import annotations

import gzip
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

from midfill.data.documents import Document, language_of
from midfill.errors import MidfillError

SKIP_DIRS = {".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".tox", "build", "dist"}
MAX_READ_BYTES = 8 * 2**20  # larger files are rejected by the size filter anyway


def read_file(path: Path, relative: str, source: str) -> Document:
    """Read a file as UTF-8; a file that is not valid UTF-8 becomes "\0", which the binary filter rejects,
    and one that cannot be read carries the reason, which the filters reject it for."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_READ_BYTES + 1)
    except OSError as exc:
        return Document(text="", path=relative, lang=language_of(relative), source=source,
                        unreadable=exc.strerror or type(exc).__name__)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"  # the binary filter rejects it
    return Document(text=text, path=relative, lang=language_of(relative), source=source)


def iter_folder(folder: Path) -> Iterator[Document]:
    for path in sorted(folder.rglob("*")):
        if any(part in SKIP_DIRS for part in path.relative_to(folder).parts[:-1]) or not path.is_file():
            continue
        if path.is_symlink():
            continue
        yield read_file(path, str(path.relative_to(folder)), str(folder))


def iter_git(repo: Path) -> Iterator[Document]:
    """Only the files git tracks: .gitignore'd build output and secrets never enter the corpus."""
    listing = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], capture_output=True)
    if listing.returncode != 0:
        raise MidfillError(f"{repo}: git ls-files failed ({listing.stderr.decode(errors='replace').strip()})")
    for name in sorted(filter(None, listing.stdout.decode("utf-8", errors="replace").split("\0"))):
        path = repo / name
        if path.is_file() and not path.is_symlink():
            yield read_file(path, name, str(repo))


def document_from_record(record: dict, source: str) -> Document | None:
    text = record.get("content")
    if not isinstance(text, str):
        return None
    path = record.get("path") or record.get("max_stars_repo_path") or ""
    license_ = record.get("license", record.get("max_stars_repo_licenses"))
    lang = record.get("lang") or language_of(path)
    return Document(text=text, path=path, lang=lang.lower() if isinstance(lang, str) else None, license=license_, source=source)


def iter_jsonl(path: Path) -> Iterator[Document]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise MidfillError(f"{path}:{number}: not a JSON line") from None
            doc = document_from_record(record, str(path))
            if doc is not None:
                yield doc


def iter_parquet(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq  # only needed for Parquet sources

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise MidfillError(f"{path}: not a readable Parquet file ({exc})") from None
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            doc = document_from_record(record, str(path))
            if doc is not None:
                yield doc


def iter_source(source: str | Path) -> Iterator[Document]:
    """Documents of one source: a git repository, a folder, or a .jsonl / .parquet shard."""
    path = Path(source)
    if path.is_dir():
        return iter_git(path) if (path / ".git").exists() else iter_folder(path)
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        return iter_jsonl(path)
    if path.suffix == ".parquet":
        return iter_parquet(path)
    if not path.exists():
        raise MidfillError(f"{source}: no such file or folder")
    raise MidfillError(f"{source}: not a folder, git repository, .jsonl or .parquet shard")
