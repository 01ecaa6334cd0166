"""The embedded model's recipe: what its corpus holds and what it records about it."""

import json
import platform

from midfill.data.installed import installed_packages, is_held_out
from midfill.recipe import write_corpus


def test_corpus_holds_the_held_out_modules_and_packages_and_records_its_python(tmp_path):
    packages = [p for p in installed_packages() if p.name in {"starlette", "cycler"}]
    write_corpus(tmp_path, packages)
    rows = [json.loads(line) for line in (tmp_path / "corpus-heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {"bisect.py", "json/decoder.py", "starlette/starlette/routing.py"} <= {r["path"] for r in rows}
    assert all(is_held_out(r["path"]) or r["path"].startswith("starlette/") for r in rows)
    assert json.loads((tmp_path / "corpus-source.json").read_text()) == {"python": platform.python_version()}
    assert json.loads((tmp_path / "corpus-manifest.json").read_text())["python"] == platform.python_version()

    before = (tmp_path / "corpus-train.jsonl").stat().st_mtime_ns
    write_corpus(tmp_path, [])  # done: skipped, whatever it would be given
    assert (tmp_path / "corpus-train.jsonl").stat().st_mtime_ns == before
