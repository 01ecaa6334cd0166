"""The `midfill` command: real runs on a tiny local model, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

import midfill
from midfill.cli import app

runner = CliRunner()


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def expected_completion(model_dir, prompt_ids, **kw) -> list[int]:
    model = midfill.load_model(model_dir)
    return midfill.generate(model, prompt_ids, **kw)


def test_complete_streams_the_greedy_completion(tiny_model_dir, small_tokenizer):
    result = invoke("complete", "--model", tiny_model_dir, "--prefix", "def f(x):\n    return", "--suffix", "\n",
                    "--mode", "free", "--max-tokens", "12")
    assert result.exit_code == 0, result.output
    prompt = midfill.fim_prompt_spm(small_tokenizer, "def f(x):\n    return", "\n")
    ids = expected_completion(tiny_model_dir, prompt, max_new_tokens=12)
    assert result.stdout == small_tokenizer.decode(ids) + "\n"
    assert "prompt tokens" in result.stderr


def test_complete_at_a_cursor_in_a_file(tiny_model_dir, small_tokenizer, tmp_path):
    source = tmp_path / "app.py"
    source.write_text("import os\n\ndef main():\n    path = os.getcwd()\n    print(path)\n")
    result = invoke("complete", "--model", tiny_model_dir, "--file", source, "--line", 4, "--column", 12,
                    "--mode", "free", "--max-tokens", "6", "--order", "psm")
    assert result.exit_code == 0, result.output
    text = source.read_text()
    cut = text.index("os.getcwd")
    prompt = midfill.fim_prompt_psm(small_tokenizer, text[:cut], text[cut:])
    ids = expected_completion(tiny_model_dir, prompt, max_new_tokens=6)
    assert result.stdout == small_tokenizer.decode(ids) + "\n"


def test_single_line_mode_prints_one_line(tiny_model_dir):
    result = invoke("complete", "--model", tiny_model_dir, "--prefix", "x = ", "--mode", "single-line",
                    "--max-tokens", "40", "--temperature", "1.0", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1


def test_chat_one_shot(tiny_model_dir):
    result = invoke("chat", "--model", tiny_model_dir, "--message", "hello", "--max-tokens", "8")
    assert result.exit_code == 0, result.output
    assert "generated" in result.stderr


def test_chat_interactive_keeps_history(tiny_model_dir):
    result = invoke("chat", "--model", tiny_model_dir, "--max-tokens", "4", input="first\nsecond\nexit\n")
    assert result.exit_code == 0, result.output
    counts = [int(line.split()[0]) for line in result.stderr.splitlines() if "prompt tokens" in line]
    assert len(counts) == 2 and counts[1] > counts[0]  # the second prompt carries the first turn


def test_info_shows_parameters_and_tokenizer(tiny_model_dir):
    result = invoke("info", "--model", tiny_model_dir)
    assert result.exit_code == 0, result.output
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert f"{midfill.load_model(tiny_model_dir).num_parameters():,}" in result.stdout
    assert str(config["n_embd"]) in result.stdout and "empty_output_id=14" in result.stdout


def test_missing_model_folder(tmp_path):
    assert_user_error(invoke("complete", "--model", tmp_path / "nope", "--prefix", "x"), "no such model folder")


def test_no_model_given_and_no_embedded_model(monkeypatch, tmp_path):
    monkeypatch.setattr("midfill.cli.common.EMBEDDED_MODEL", tmp_path / "absent")
    assert_user_error(invoke("complete", "--prefix", "x"), "no --model given")


def test_bad_dtype(tiny_model_dir):
    assert_user_error(invoke("complete", "--model", tiny_model_dir, "--dtype", "fp4"), "unknown dtype 'fp4'")


def test_bad_mode_and_order(tiny_model_dir):
    assert_user_error(invoke("complete", "--model", tiny_model_dir, "--mode", "lines"), "unknown completion mode")
    assert_user_error(invoke("complete", "--model", tiny_model_dir, "--order", "xyz"), "unknown --order 'xyz'")


def test_cursor_outside_the_file(tiny_model_dir, tmp_path):
    source = tmp_path / "a.py"
    source.write_text("x = 1\n")
    assert_user_error(invoke("complete", "--model", tiny_model_dir, "--file", source, "--line", 9), "--line 9")
    assert_user_error(invoke("complete", "--model", tiny_model_dir, "--file", source, "--column", 99), "--column 99")
    assert_user_error(invoke("complete", "--model", tiny_model_dir, "--file", tmp_path / "b.py"), "no such file")


def test_mismatched_tokenizer(golden_dir, refact_tokenizer):
    result = invoke("complete", "--model", golden_dir, "--tokenizer", refact_tokenizer.source, "--prefix", "x")
    assert_user_error(result, "49152 tokens", "--tokenizer")


def test_model_without_tokenizer(golden_dir):
    assert_user_error(invoke("complete", "--model", golden_dir, "--prefix", "x"), "tokenizer.json is missing")


def test_truncated_checkpoint(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((tiny_model_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:1000])
    assert_user_error(invoke("info", "--model", broken), "model.safetensors", "truncated or corrupt")


def test_max_tokens_too_large_for_context(tiny_model_dir):
    assert_user_error(invoke("complete", "--model", tiny_model_dir, "--max-tokens", "300"), "no room for a prompt")


def test_hub_id_offline_in_a_real_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "midfill.cli", "info", "--model", "smallcloudai/Refact-1_6B-fim"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "smallcloudai/Refact-1_6B-fim" in proc.stderr and "--model /path/to/folder" in proc.stderr


def test_serve_starts_answers_and_stops_on_sigterm(tiny_model_dir, tmp_path):
    import signal
    import time

    import httpx

    from midfill.server.background import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "midfill.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port), "--name", "tiny"],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not come up"
            time.sleep(0.1)
        reply = httpx.post(f"http://127.0.0.1:{port}/infill", json={"input_prefix": "x", "n_predict": 3}).json()
        assert reply["tokens_predicted"] <= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
    startup = proc.stderr.read()
    assert f"http://127.0.0.1:{port}" in startup and "serving tiny" in startup and "float32" in startup
    assert "stopped; 0 unfinished requests cancelled" in startup  # the lifespan's shutdown ran
    assert "Traceback" not in startup


def test_serve_bad_option(tiny_model_dir):
    assert_user_error(invoke("serve", "--model", tiny_model_dir, "--fim-order", "mps"), "unknown --fim-order")


def test_quantize_then_complete_with_the_packed_checkpoint(tiny_model_dir, tmp_path):
    packed = tmp_path / "int8"
    result = invoke("quantize", "--model", tiny_model_dir, "--format", "int8", "--out", packed)
    assert result.exit_code == 0, result.output
    assert (packed / "tokenizer.json").is_file()
    info = invoke("info", "--model", packed)
    assert info.exit_code == 0 and "int8" in info.stdout
    prompt = "def f(x):\n    return"
    result = invoke("complete", "--model", packed, "--prefix", prompt, "--mode", "free", "--max-tokens", "6")
    assert result.exit_code == 0, result.output
    on_the_fly = invoke("complete", "--model", tiny_model_dir, "--quantize", "int8", "--prefix", prompt, "--mode", "free",
                        "--max-tokens", "6")  # fmt: skip
    assert on_the_fly.stdout == result.stdout


def test_bad_quantize_format(tiny_model_dir, tmp_path):
    assert_user_error(invoke("complete", "--model", tiny_model_dir, "--quantize", "int3"), "int3", "int8")
    assert_user_error(invoke("quantize", "--model", tiny_model_dir, "--format", "fp8", "--out", tmp_path), "fp8")
