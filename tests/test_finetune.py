"""LoRA adapters and the repository finetune: exactness of adapters, file selection, resume, bad input."""

import subprocess

import pytest
import torch
from typer.testing import CliRunner

from midfill.cli import app
from midfill.data.repo import collect
from midfill.errors import MidfillError
from midfill.model.checkpoint import load_model
from midfill.model.lora import LoraConfig, add_lora, load_adapter, lora_layers, merge_lora, save_adapter
from midfill.train.finetune import FinetuneConfig, finetune, loss_outliers
from midfill.train.run_folder import RunFolder

from .helpers import tiny_model

runner = CliRunner()


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids)


def test_fresh_adapter_leaves_logits_unchanged():
    ids = torch.randint(0, 512, (2, 20))
    model = tiny_model()
    before = logits(model, ids)
    names = add_lora(model, LoraConfig(r=4))
    assert len(names) == 5 * model.config.n_layer
    assert torch.equal(logits(model, ids), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def trained_adapter(seed: int = 0):
    model = tiny_model()
    config = LoraConfig(r=4, alpha=8)
    add_lora(model, config)
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_b.data.normal_(0, 0.05)
    return model, config


def test_merge_equals_adapter_on(tmp_path):
    model, config = trained_adapter()
    ids = torch.randint(0, 512, (2, 20))
    with_adapter = logits(model, ids)
    assert not torch.allclose(with_adapter, logits(tiny_model(), ids))  # the adapter does something
    save_adapter(model, config, tmp_path)
    merged = merge_lora(model)
    assert not lora_layers(merged)
    torch.testing.assert_close(logits(merged, ids), with_adapter, rtol=1e-5, atol=1e-5)
    reloaded = tiny_model()
    load_adapter(reloaded, tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), with_adapter, rtol=1e-6, atol=1e-6)


def test_adapter_for_another_shape_is_refused(tmp_path):
    model, config = trained_adapter()
    save_adapter(model, config, tmp_path)
    with pytest.raises(MidfillError, match="another shape"):
        load_adapter(tiny_model(n_embd=128), tmp_path)
    with pytest.raises(MidfillError, match="not a LoRA adapter folder"):
        load_adapter(tiny_model(), tmp_path / "missing")


def test_collect_keeps_code_and_says_why_not(code_corpus, tmp_path):
    files = collect([code_corpus])
    kept = {d.path.split("/", 1)[1] for d in files.accepted}
    reasons = {path.split("/", 1)[1]: reason for path, reason in files.rejected}
    assert "textwrap.py" in kept and "heapq.py" in kept
    assert "duplicate of another file" in (reasons.get("copy_of_glob.py"), reasons.get("glob.py"))
    assert reasons["bundle.min.js"] == "minified" and reasons["notes.txt"] == "binary"
    assert "README.md" in reasons
    only = collect([code_corpus], include=["*.py"], exclude=["heap*"])
    assert {d.path.split("/", 1)[1] for d in only.accepted} <= kept - {"heapq.py"}


def test_gitignore_respected(tmp_path):
    (tmp_path / "app.py").write_text("def main():\n    return 'hello from the app module'\n" * 3)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "gen.py").write_text("def generated():\n    return 'build output, ignored by git'\n" * 3)
    (tmp_path / ".gitignore").write_text("build/\n")
    assert [d.path for d in collect([tmp_path]).accepted] == [f"{tmp_path.name}/app.py"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "app.py", ".gitignore"], check=True)
    assert [d.path for d in collect([tmp_path]).accepted] == [f"{tmp_path.name}/app.py"]


def test_loss_outliers_name_the_file_and_the_numbers():
    reasons = loss_outliers([2.0, 2.1, 1.9, 2.05, 1.95, 6.5, float("inf")], z=3.5)
    assert reasons[:5] == [None] * 5
    assert "6.50" in reasons[5] and "median 2.02" in reasons[5]  # the median of the six finite losses
    assert reasons[6] == "no tokens"


def small_run(tiny_model_dir, repo, out, **overrides) -> FinetuneConfig:
    settings = dict(repos=[str(repo)], out=str(out), model=str(tiny_model_dir), r=4, block=64, batch_size=2,
                    max_steps=6, eval_every=2, warmup_steps=2, exact_match_examples=3, test_files=1)  # fmt: skip
    return FinetuneConfig(**{**settings, **overrides})


def test_finetune_lowers_test_loss_and_resumes_exactly(tiny_model_dir, code_corpus, tmp_path):
    whole = finetune(small_run(tiny_model_dir, code_corpus, tmp_path / "whole", lr=3e-3), log=lambda m: None)
    assert whole["finetuned"]["test_loss"] < whole["base"]["test_loss"]
    assert (tmp_path / "whole" / "test_loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())[0].startswith("step-000002-loss-")

    config = small_run(tiny_model_dir, code_corpus, tmp_path / "resumed", lr=3e-3)
    folder = RunFolder(config.out)
    assert finetune(config, log=lambda m: None, until_step=2) == {}
    state_at_2 = folder.checkpoint.read_bytes()
    assert finetune(config, log=lambda m: None, until_step=3) == {}
    folder.checkpoint.write_bytes(state_at_2)  # "killed" after step 3, before its checkpoint: state from step 2
    resumed = finetune(config, log=lambda m: None)
    assert resumed["steps"] == whole["steps"]
    assert [r["step"] for r in folder.rows()] == [r["step"] for r in RunFolder(tmp_path / "whole").rows()]  # step 3 once
    assert resumed["finetuned"]["test_loss"] == pytest.approx(whole["finetuned"]["test_loss"], rel=1e-5)
    changed = small_run(tiny_model_dir, code_corpus, tmp_path / "resumed", lr=1e-3)
    with pytest.raises(MidfillError, match="other settings"):
        finetune(changed, log=lambda m: None)


def test_finetune_stops_early_when_the_test_loss_stalls(tiny_model_dir, code_corpus, tmp_path):
    report = finetune(small_run(tiny_model_dir, code_corpus, tmp_path, lr=0.0, patience=1), log=lambda m: None)
    assert report["steps"] == 4  # evaluations after steps 2 and 4: the second is no better, with nothing learned
    assert "/step-000002-loss-" in report["finetuned"]["checkpoint"]  # the best is the first
    assert RunFolder(tmp_path).read_progress() == {"state": "done", "step": 4, "total": 4, "test_loss": report["finetuned"]["test_loss"],
                                                   "eta_s": 0}  # fmt: skip


def test_junk_only_repository_ends_with_a_clear_message(tiny_model_dir, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "blob.bin").write_bytes(bytes(range(256)) * 40)
    (junk / "vendor.min.js").write_text("var x=" + ",".join(map(str, range(3000))))
    (junk / "notes.txt").write_bytes(b"\x00\x01" * 300)
    result = runner.invoke(app, ["finetune", str(junk), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "no usable code to finetune on" in result.stderr and "Traceback" not in result.output


def test_cli_finetune_merge_and_serve_the_adapter(tiny_model_dir, code_corpus, tmp_path):
    result = runner.invoke(app, ["finetune", str(code_corpus), "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
                                 "--max-steps", "4", "--eval-every", "2", "--block", "64", "--r", "4", "--test-files", "1",
                                 "--patience", "5", "--middle-only"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "rejected: minified" in result.stderr and "| finetuned" in result.stdout
    settings = torch.load(RunFolder(tmp_path / "run").checkpoint, weights_only=False)["config"]
    assert settings["patience"] == 5 and settings["middle_only_loss"] is True and settings["r"] == 4
    adapter = tmp_path / "run" / "adapter"
    merged_dir = tmp_path / "merged"
    result = runner.invoke(app, ["lora", "merge", "--model", str(tiny_model_dir), "--lora", str(adapter), "--out", str(merged_dir)])
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 480, (1, 16))
    adapter_on = load_model(tiny_model_dir)
    load_adapter(adapter_on, adapter)
    torch.testing.assert_close(logits(load_model(merged_dir), ids), logits(adapter_on, ids), rtol=1e-5, atol=1e-5)
    args = ["complete", "--prefix", "def f(x):\n    return", "--mode", "free", "--max-tokens", "8"]
    with_lora = runner.invoke(app, [*args, "--model", str(tiny_model_dir), "--lora", str(adapter)])
    merged = runner.invoke(app, [*args, "--model", str(merged_dir)])
    assert with_lora.exit_code == 0 and with_lora.stdout == merged.stdout
