"""Training end to end on CPU: the loss falls, the output loads, a killed run resumes exactly,
two torchrun processes match one process with the same global batch, "auto" measures its dtype
without a trace, MFU is logged, and a compiled run follows the eager one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import midfill
from midfill.cli import app
from midfill.errors import MidfillError
from midfill.model.lora import LoraConfig, add_lora
from midfill.train import hardware
from midfill.train.config import TrainConfig, load_config
from midfill.train.schedule import early_dropout, learning_rate
from midfill.train.trainer import train
from tests.helpers import tiny_model

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
    assert all(0 < r["mfu"] < 1 for r in rows)  # a float32 run on a CPU: of the measured float32 matmul peak
    survey = json.loads((out / "hardware.json").read_text())
    assert survey["dtype"] == "float32" and survey["chosen_by"] == "config" and survey["peak_from"] == "measured matmul"
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
        (write_config(tmp_path / "e.toml", data=str(built_data), out_dir="o", compile="yes"), "compile must be"),
        (write_config(tmp_path / "f.toml", data=str(built_data), out_dir="o", attention="dense"), "unknown attention"),
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


def two_steps(data, out: Path, **settings) -> list[float]:
    config = TrainConfig(data=str(data), out_dir=str(out), preset="tiny", steps=2, micro_batch=4, block_size=64,
                         warmup_steps=1, eval_every=0, checkpoint_every=100, **settings)  # fmt: skip
    train(config, show_progress=False)
    return losses(out)


def test_auto_dtype_measures_both_and_leaves_no_trace():
    model = tiny_model().train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    survey = hardware.survey(model, "auto", compiled=False, micro_batch=4, block_size=64)
    assert survey.chosen_by == "measured" and set(survey.tokens_per_s) == {"float32", "bfloat16"}
    assert survey.dtype == max(survey.tokens_per_s, key=survey.tokens_per_s.get)
    assert survey.peak_flops > 0 and "measured" in survey.summary()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_auto_takes_the_faster_dtype_and_a_resumed_run_keeps_its_own(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(hardware, "matmul_peak_flops", lambda dtype, device: 1e11)
    for rates, faster in (({"float32": 1.0, "bfloat16": 2.0}, "bfloat16"), ({"float32": 2.0, "bfloat16": 1.0}, "float32")):
        monkeypatch.setattr(hardware, "measure_dtypes", lambda *args, rates=rates: rates)
        assert hardware.survey(model, "auto", False, 4, 64).dtype == faster
    kept = hardware.survey(model, "auto", False, 4, 64, kept="bfloat16")
    assert (kept.dtype, kept.chosen_by, kept.tokens_per_s) == ("bfloat16", "checkpoint", {})
    assert hardware.survey(model, "float32", False, 4, 64).chosen_by == "config"


def test_an_auto_run_logs_its_choice_and_trains_as_that_dtype_would(built_data, tmp_path):
    auto = two_steps(built_data, tmp_path / "auto", dtype="auto")
    survey = json.loads((tmp_path / "auto" / "hardware.json").read_text())
    assert survey["chosen_by"] == "measured" and set(survey["tokens_per_s"]) == {"float32", "bfloat16"}
    assert json.loads((tmp_path / "auto" / "progress.json").read_text())["dtype"] == survey["dtype"]
    assert auto == two_steps(built_data, tmp_path / "fixed", dtype=survey["dtype"])


def test_model_flops_per_token():
    model = tiny_model()  # 512 vocab, 64 wide, 2 layers
    c = model.config
    weights = model.num_parameters() - c.vocab_size * c.n_embd  # all but the embedding; lm_head counts
    attention = 6 * c.n_layer * 128 * c.n_embd
    assert hardware.flops_per_token(model, 128) == 6 * weights + attention
    add_lora(model, LoraConfig(r=4))  # frozen weights: forward and input gradient only
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert hardware.flops_per_token(model, 128) == 4 * (weights + adapters) + 2 * adapters + attention


def test_gpu_peaks_by_name():
    assert hardware.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert hardware.gpu_peak_flops("NVIDIA L40S") == 362e12 and hardware.gpu_peak_flops("NVIDIA L4") == 121e12
    assert hardware.gpu_peak_flops("Tesla T4") is None


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on a CPU needs a C++ compiler")
def test_compiled_run_follows_the_eager_one(built_data, tmp_path):
    """Inductor on CPU compiles the blocks' attention and MLP with gcc in about ten seconds."""
    eager = two_steps(built_data, tmp_path / "eager", dtype="float32", compile=False)
    compiled = two_steps(built_data, tmp_path / "compiled", dtype="float32", compile=True)
    assert json.loads((tmp_path / "compiled" / "hardware.json").read_text())["compiled"] is True
    assert compiled == pytest.approx(eager, abs=1e-4)


def test_flex_attention_does_not_train_on_a_cpu(built_data, tmp_path):
    with pytest.raises(MidfillError, match="only on a GPU"):
        two_steps(built_data, tmp_path, dtype="float32", attention="flex")
