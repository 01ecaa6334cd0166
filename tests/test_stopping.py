"""The infill metrics: batched completions are one-at-a-time greedy, healing runs, the report and the card's table."""

from __future__ import annotations

import random
from dataclasses import asdict, fields

import pytest

from midfill.data.fim_synth import example_line_start, example_multi, example_rest_of_line
from midfill.engine import StopRules, TextAssembler, stream_text
from midfill.eval.stopping import KINDS, StoppingReport, evaluate_stopping, held_out_examples
from midfill.hub import EMBEDDED_MODEL
from midfill.infill import complete, complete_all, sample_examples
from midfill.model.checkpoint import load_model
from midfill.model_card import METRICS, metrics_table
from midfill.prompts import fim_prompt_spm
from midfill.tokenizer import load_tokenizer
from tests.helpers import stdlib_texts

TEXTS = stdlib_texts(12)
BUDGET, MAX_NEW = 256, 24
embedded = pytest.mark.skipif(not (EMBEDDED_MODEL / "model.safetensors").is_file(), reason="no embedded model in this checkout")


@pytest.fixture(scope="module")
def shipped():
    return load_model(EMBEDDED_MODEL), load_tokenizer(EMBEDDED_MODEL)


def test_held_out_examples_are_seeded_per_kind():
    examples = held_out_examples(TEXTS, per_kind=5, seed=3)
    assert list(examples) == list(KINDS) and all(len(v) == 5 and {e.kind for e in v} == {k} for k, v in examples.items())
    assert examples == held_out_examples(TEXTS, per_kind=5, seed=3) != held_out_examples(TEXTS, per_kind=5, seed=4)


@embedded
@pytest.mark.parametrize("rules", [StopRules(), StopRules.for_mode("single-line")], ids=["model-stopped", "single-line"])
def test_batched_completions_are_one_at_a_time_greedy(shipped, rules):
    model, tok = shipped
    rng = random.Random(0)
    examples = sample_examples(TEXTS, example_multi, 3, rng) + sample_examples(TEXTS, example_rest_of_line, 4, rng)
    batched = [r.text for r in complete_all(model, tok, examples, rules, BUDGET, MAX_NEW, batch=4)]
    assert batched == [complete(model, tok, e, rules, BUDGET, MAX_NEW) for e in examples]
    alone = []  # the library's own one-request path
    for e in examples:
        assembler = TextAssembler(tok, rules)
        alone.append("".join(stream_text(model, fim_prompt_spm(tok, e.prefix, e.suffix, BUDGET), assembler, MAX_NEW,
                                         stop_ids={tok.eot_id})))  # fmt: skip
    assert batched == alone


@embedded
def test_healing_goes_through_the_engine_and_batches_alike(shipped):
    """At column 0 the unhealed prompt ends in a bare newline the model never saw end a prompt; healed, the
    engine backs it off: answers differ somewhere, and batched healed answers are the one-at-a-time ones."""
    model, tok = shipped
    examples = sample_examples(TEXTS, example_line_start, 4, random.Random(1))
    rules = StopRules.for_mode("single-line")
    healed = [r.text for r in complete_all(model, tok, examples, rules, BUDGET, MAX_NEW, heal=True, batch=4)]
    assert healed == [complete(model, tok, e, rules, BUDGET, MAX_NEW, heal=True) for e in examples]
    assert healed != [complete(model, tok, e, rules, BUDGET, MAX_NEW) for e in examples]


@embedded
def test_evaluate_stopping_reports_every_metric(shipped):
    model, tok = shipped
    examples = held_out_examples(TEXTS, per_kind=2, seed=1)
    report = evaluate_stopping(model, tok, examples, max_new_tokens=8)
    values = asdict(report)
    assert report.examples == {kind: 2 for kind in KINDS}
    assert all(0.0 <= values[f.name] <= 1.0 for f in fields(StoppingReport) if f.name not in ("examples", "over_generation_chars"))
    assert report.over_generation_chars >= 0
    assert set(values) - {"examples"} <= {key for key, _, _ in METRICS}  # the card shows every metric


def test_the_card_table_shows_old_reports_with_dashes():
    new = {key: 0.5 for key, _, _ in METRICS} | {"examples": {}}
    old = {"single_line_exact_match": 0.05, "multi_line_stopped_right": 0.09, "empty_middle_accuracy": 0.92,
           "over_generation_chars": 12.5, "examples": {"single": 100, "multi": 100, "empty": 100}}  # fmt: skip
    head, _, *rows = metrics_table({"pretrain": old, "finetune": new}).split("\n")
    assert head == "| metric | before finetune | after finetune |" and len(rows) == len(METRICS)
    assert "| single-line infill exact match | – | 50.0% |" in rows
    assert "| empty-middle accuracy | 92.0% | 50.0% |" in rows
    assert sum("healing on" in row for row in rows) == 2
