"""A team's own repositories as finetuning data: the files worth learning from, and why the others are not.

Git repositories contribute the files git tracks; plain folders their files minus what the
top-level .gitignore names. Every file is kept or rejected with a reason the user is shown.
"""

from __future__ import annotations

import fnmatch
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pathspec import GitIgnoreSpec

from midfill.data.dedup import Deduplicator, minhash_signature
from midfill.data.documents import NATURAL_LANGUAGE, Document
from midfill.data.filters import FilterConfig, reject_reason
from midfill.data.sources import iter_folder, iter_git
from midfill.errors import MidfillError


@dataclass
class RepoFiles:
    accepted: list[Document] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def is_git_repo(folder: Path) -> bool:
    probe = subprocess.run(["git", "-C", str(folder), "rev-parse", "--is-inside-work-tree"], capture_output=True)
    return probe.returncode == 0 and probe.stdout.strip() == b"true"


def repo_documents(folder: Path) -> list[Document]:
    if not folder.is_dir():
        raise MidfillError(f"{folder}: no such folder; pass the root of a repository")
    if is_git_repo(folder):
        return list(iter_git(folder))
    ignore = folder / ".gitignore"
    spec = GitIgnoreSpec.from_lines(ignore.read_text(errors="replace").splitlines()) if ignore.is_file() else None
    return [doc for doc in iter_folder(folder) if spec is None or not spec.match_file(doc.path)]


def selected(path: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(fnmatch.fnmatch(path, pattern) for pattern in include):
        return False
    return not any(fnmatch.fnmatch(path, pattern) for pattern in exclude)


def collect(repos: list[Path], include: list[str] = (), exclude: list[str] = ()) -> RepoFiles:
    """Source files of the repositories that pass the quality filters, exact and near duplicates removed."""
    result = RepoFiles()
    config = FilterConfig(natural_language_text=False)
    dedup = Deduplicator()
    for repo in repos:
        for doc in repo_documents(Path(repo)):
            path = f"{Path(repo).name}/{doc.path}"
            if not selected(doc.path, list(include), list(exclude)):
                result.rejected.append((path, "excluded by --include/--exclude"))
                continue
            reason = reject_reason(doc, config)
            if reason is None and doc.lang in NATURAL_LANGUAGE:
                reason = "documentation, not code"
            if reason is None and not dedup.keep(doc.text, minhash_signature(doc.text)):
                reason = "duplicate of another file"
            if reason is not None:
                result.rejected.append((path, reason))
            else:
                result.accepted.append(Document(text=doc.text, path=path, lang=doc.lang, source=str(repo)))
    return result


def split_test_files(docs: list[Document], seed: int, count: int | None = None) -> tuple[list[Document], list[Document]]:
    """(train, test): a few whole files held out, about 10% of them, between 1 and 5 unless `count` says."""
    if len(docs) < 2:
        raise MidfillError(f"only {len(docs)} usable file(s): a finetune needs at least 2, one of them held out for testing")
    count = count if count is not None else min(5, max(1, len(docs) // 10))
    count = min(count, len(docs) - 1)
    order = sorted(docs, key=lambda d: d.path)
    random.Random(seed).shuffle(order)
    return order[count:], order[:count]
