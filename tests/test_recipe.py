"""The embedded model's recipe: what its corpus holds and what it records about it."""

import json
import platform

from midfill.recipe import is_held_out, write_corpus


def test_held_out_corpus_keeps_only_held_out_modules_and_records_its_python(tmp_path):
    corpus = write_corpus(tmp_path / "corpus-heldout.jsonl", held_out=True)
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert {"bisect.py", "json/decoder.py"} <= {r["path"] for r in rows}
    assert all(is_held_out(r["path"]) for r in rows)
    assert json.loads((tmp_path / "corpus-source.json").read_text()) == {"python": platform.python_version()}
