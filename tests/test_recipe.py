"""The embedded model's recipe: what its corpus holds and what it records about it."""

import dataclasses
import json
import platform

import pytest
import torch
from safetensors import safe_open

from midfill.data.installed import HELD_OUT, installed_packages, is_held_out, stdlib_root, write_installed_corpus
from midfill.errors import MidfillError
from midfill.files import write_text_atomic
from midfill.model_card import METRICS, corpus_summary
from midfill.recipe import Recipe, embedded_recipe, evaluate_model, export, run_recipe, stage_config, write_corpus
from midfill.train.run_folder import RunFolder


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


MICRO = Recipe(shape=dict(n_embd=32, n_layer=1, n_head=2, n_positions=256), pretrain_steps=3, finetune_steps=2, micro_batch=2,
               block_size=128, finetune_examples=40, eval_per_kind=2, humaneval_tokens=8, humaneval_problems=2)


def micro_corpus(out, small_tokenizer):
    """A recipe folder whose corpus (three stdlib modules to train on, one held out) and tokenizer are already there."""
    out.mkdir()
    write_text_atomic(out / "corpus-source.json", json.dumps({"python": platform.python_version()}) + "\n")
    for split, names in (("train", ("textwrap.py", "shlex.py", "heapq.py")), ("heldout", ("bisect.py",))):
        rows = [{"content": (stdlib_root() / n).read_text(encoding="utf-8"), "path": n, "lang": "python", "license": "psf-2.0"}
                for n in names]
        write_text_atomic(out / f"corpus-{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    small_tokenizer.save(out / "tokenizer.json")


def test_rows_that_differ_only_after_pretraining_share_it_and_each_gets_a_report(tmp_path, small_tokenizer):
    out = tmp_path / "recipe"
    micro_corpus(out, small_tokenizer)
    card = run_recipe(out, MICRO, log=lambda message: None)
    fim_only = run_recipe(out, dataclasses.replace(MICRO, finetune="fim"), log=lambda message: None)
    none = run_recipe(out, dataclasses.replace(MICRO, finetune="none"), log=lambda message: None)
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["pretrain-lion-dropout0.1-dedup-3", "pretrain-lion-dropout0.1-dedup-3-finetune-card-2",
                    "pretrain-lion-dropout0.1-dedup-3-finetune-fim-2", "pretrain-lion-dropout0.1-dedup-5"]  # no-finetune: the same compute
    assert len(RunFolder(out / "runs" / "pretrain-lion-dropout0.1-dedup-5").rows()) == 5
    for report in (card, fim_only, none):
        assert {"line_exact_match", "held_out_loss", "humaneval_fim", "humaneval_completion", "chat_answer"} <= set(report)
        assert 0 < report["held_out_loss"] and 0 <= report["humaneval_fim"] <= 1
    card_mix = json.loads((out / "finetune-data" / "manifest.json").read_text())["examples_per_kind"]
    fim_mix = json.loads((out / "finetune-data-fim" / "manifest.json").read_text())["examples_per_kind"]
    assert any(k.startswith("instruct") for k in card_mix) and not any(k.startswith("instruct") for k in fim_mix)
    assert run_recipe(out, MICRO, log=lambda message: None) == card  # cached: a rerun reports, it does not retrain
    with pytest.raises(MidfillError, match="holds a mix of 40 examples, this recipe asks for 41"):
        run_recipe(out, dataclasses.replace(MICRO, finetune_examples=41), log=lambda message: None)


def test_unknown_finetune_is_a_clear_error():
    with pytest.raises(MidfillError, match="unknown finetune"):
        dataclasses.replace(MICRO, finetune="half")


def test_export_writes_the_card_with_every_metric_and_the_chat_answer(tmp_path, small_tokenizer):
    out = tmp_path / "recipe"
    micro_corpus(out, small_tokenizer)
    report = run_recipe(out, MICRO, keyed=False, log=lambda message: None)
    pre = evaluate_model(out, out / "pretrain", MICRO, log=lambda message: None)
    folder = export(out, {"pretrain": pre, "finetune": report}, MICRO)
    card = (folder / "MODEL_CARD.md").read_text()
    assert "| single-line infill exact match |" in card and "| HumanEval pass@1, fim format (greedy, n=1) |" in card
    assert f"```text\n{report['chat_answer'].strip()}\n```" in card
    assert "standard library" in card
    rows = [line for line in card.splitlines() if any(line.startswith(f"| {label} |") for _, label, _ in METRICS)]
    assert len(rows) == len(METRICS) and not any("–" in row for row in rows)  # every metric measured, none missing
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}  # shipped in bf16


def test_a_continued_recipe_keeps_the_base_tokenizer_starts_from_its_weights_and_reports_it(tmp_path, small_tokenizer):
    first = tmp_path / "first"
    micro_corpus(first, small_tokenizer)
    base = embedded_recipe(first, log=lambda message: None, recipe=MICRO)
    second = tmp_path / "second"
    micro_corpus(second, small_tokenizer)
    (second / "tokenizer.json").unlink()  # the continuation takes the base's
    continued = dataclasses.replace(MICRO, early_dropout=0.0)
    folder = embedded_recipe(second, base=base, log=lambda message: None, recipe=continued)
    assert (second / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    pre = stage_config(dataclasses.replace(continued, base=str(second / "base" / "model")), "pretrain", second / "pretrain-data", second / "pretrain")
    assert pre.init_from == str(second / "base" / "model") and pre.lr == 2e-4 and pre.early_dropout == 0.0  # the finetune's rate
    first_step = RunFolder(second / "pretrain").rows()[0]["loss"]
    fresh_step = RunFolder(first / "pretrain").rows()[0]["loss"]
    assert first_step < fresh_step  # it starts where the base ended, not from a new network
    card = (folder / "MODEL_CARD.md").read_text()
    assert "| metric | base model | before finetune | after finetune |" in card and "**Continued pretraining**" in card
    assert json.loads((second / "base" / "eval.json").read_text())["held_out_loss"] > 0

    with pytest.raises(MidfillError, match="continues another base"):
        embedded_recipe(second, base=second / "model", log=lambda message: None, recipe=continued)

    other = tmp_path / "other"
    micro_corpus(other, small_tokenizer)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"<fim_prefix>"', '"<fim_prefix>" '))
    with pytest.raises(MidfillError, match="holds another tokenizer"):
        embedded_recipe(other, base=base, log=lambda message: None, recipe=continued)


def test_the_card_names_the_corpus_packages_from_its_manifest(tmp_path):
    packages = [p for p in installed_packages() if p.name in {"cycler", "starlette", "jinja2"}]
    write_installed_corpus(tmp_path / "train.jsonl", tmp_path / "heldout.jsonl", tmp_path / "corpus-manifest.json", packages)
    text, licences = corpus_summary(tmp_path, "3.11.7", HELD_OUT)
    cycler = next(p for p in packages if p.name == "cycler")
    assert f"cycler {cycler.version}" in text and "jinja2 (reserved" in text and "Held out for evaluation" in text
    assert "starlette" in text.split("Held out for evaluation")[1]
    assert licences.startswith("permissive only: ") and "PSF-2.0" in licences
