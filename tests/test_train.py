"""Training end to end on CPU: the loss falls, the output loads, a killed run resumes exactly,
and two torchrun processes match one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import midfill
from midfill.cli import app
from midfill.train.config import TrainConfig, load_config
from midfill.train.schedule import early_dropout, learning_rate
from midfill.train.trainer import train

BASE = {
    "preset": "tiny", "steps": 200, "micro_batch": 4, "block_size": 128, "lr": 2e-3, "min_lr": 2e-4,
    "warmup_steps": 5, "eval_every": 10, "eval_batches": 2, "checkpoint_every": 5, "dtype": "float32",
    "early_dropout": 0.1, "early_dropout_fraction": 0.1,
}


def write_config(path: Path, **settings) -> Path:
    lines = []
    for key, value in {**BASE, **settings}.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(built_data, tmp_path_factory):
    """40 uninterrupted steps of a 200-step schedule."""
    folder = tmp_path_factory.mktemp("reference")
    config = load_config(write_config(folder / "run.toml", data=str(built_data), out_dir=str(folder / "out")))
    model_dir = train(config, until_step=40, show_progress=False)
    return folder / "out", model_dir


def test_loss_falls_and_the_output_loads_and_generates(reference_run):
    out, model_dir = reference_run
    values = losses(out)
    assert len(values) == 40
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 0.5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["dropout"] == pytest.approx(0.1) and rows[-1]["dropout"] == 0.0  # early dropout, then off
    assert any("val_loss" in r for r in rows)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    model = midfill.load_model(model_dir)
    tok = midfill.load_tokenizer(model_dir)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= tok.vocab_size
    ids = midfill.generate(model, midfill.fim_prompt_spm(tok, "def f(x):\n    return ", "\n"), max_new_tokens=8)
    assert isinstance(ids, list)


def test_killed_run_resumes_with_the_same_losses(built_data, reference_run, tmp_path):
    config_path = write_config(tmp_path / "run.toml", data=str(built_data), out_dir=str(tmp_path / "out"))
    command = [sys.executable, "-m", "midfill.cli", "train", "--config", str(config_path), "--until-step", "40"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "out" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(losses(tmp_path / "out"))
    assert killed_at < 40, "the run finished before it could be killed"
    result = CliRunner().invoke(app, ["train", "--config", str(config_path), "--until-step", "40"])
    assert result.exit_code == 0, result.output
    assert losses(tmp_path / "out") == losses(reference_run[0])


def test_schedules():
    config = TrainConfig(data="d", out_dir="o", steps=100, warmup_steps=10, lr=1.0, min_lr=0.1,
                         early_dropout=0.2, early_dropout_fraction=0.5)
    assert learning_rate(config, 0) == pytest.approx(0.1) and learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 99) == pytest.approx(0.1, abs=1e-3)
    assert early_dropout(config, 0) == pytest.approx(0.2) and early_dropout(config, 25) == pytest.approx(0.1)
    assert early_dropout(config, 50) == 0.0 and early_dropout(config, 99) == 0.0


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(built_data, tmp_path, parallel):
    common = dict(data=str(built_data), steps=6, micro_batch=2, block_size=64, checkpoint_every=3, eval_every=3)
    single = write_config(tmp_path / "single.toml", out_dir=str(tmp_path / "single"), grad_accum=2, **common)
    double = write_config(tmp_path / "double.toml", out_dir=str(tmp_path / "double"), grad_accum=1, parallel=parallel, **common)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "midfill.cli", "train", "--config", str(double)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert CliRunner().invoke(app, ["train", "--config", str(single)]).exit_code == 0
    assert losses(tmp_path / "double") == pytest.approx(losses(tmp_path / "single"), abs=1e-4)


def test_bad_configs_are_clear_errors(tmp_path, built_data):
    runner = CliRunner()
    cases = [
        (write_config(tmp_path / "a.toml", data=str(built_data), out_dir="o", colour="red"), "unknown setting 'colour'"),
        (write_config(tmp_path / "b.toml", data=str(built_data), out_dir="o", preset="huge"), "unknown preset 'huge'"),
        (write_config(tmp_path / "c.toml", data=str(tmp_path / "none"), out_dir="o"), "no manifest"),
        (tmp_path / "missing.toml", "no such config file"),
    ]
    (tmp_path / "d.toml").write_text("steps = [")
    cases.append((tmp_path / "d.toml", "cannot parse it"))
    for path, words in cases:
        result = runner.invoke(app, ["train", "--config", str(path)])
        assert result.exit_code == 2 and words in result.stderr, (words, result.output)


def test_shipped_configs_parse(tmp_path):
    for path in (Path(__file__).parents[1] / "configs").glob("*.toml"):
        config = load_config(path)
        assert config.shape()["n_positions"] >= config.block_size
