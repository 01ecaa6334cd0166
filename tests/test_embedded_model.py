"""The model shipped inside midfill: it loads, fills in the middle and chats, with no network."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import midfill
from midfill.engine import StopRules, TextAssembler, stream_text
from midfill.hub import EMBEDDED_MODEL
from midfill.prompts import ChatMessage, chat_prompt, fim_prompt_spm

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_MODEL / "model.safetensors").is_file(),
    reason="no embedded model in this checkout (make one: midfill recipe embedded --out DIR --install)",
)


@pytest.fixture(scope="module")
def shipped():
    return midfill.load_model(EMBEDDED_MODEL, dtype="float32"), midfill.load_tokenizer(EMBEDDED_MODEL)


def test_shipped_files_and_size():
    names = {p.name for p in EMBEDDED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"} <= names
    assert (EMBEDDED_MODEL / "model.safetensors").stat().st_size <= 40 * 2**20
    assert "| single-line infill exact match |" in (EMBEDDED_MODEL / "MODEL_CARD.md").read_text()


def test_fim_completion_is_python_and_stops(shipped):
    model, tok = shipped
    prefix = "def read_lines(path):\n    with open(path) as f:\n        "
    assembler = TextAssembler(tok, StopRules.for_mode("multi-line", cursor_indent=8))
    text = "".join(stream_text(model, fim_prompt_spm(tok, prefix, "\n\n"), assembler, 48, stop_ids={tok.eot_id}))
    assert assembler.finish_reason in ("eos", "stop", "length")
    assert text == assembler.text and "\ufffd" not in text


def test_chat_answers(shipped):
    model, tok = shipped
    ids = chat_prompt(tok, [ChatMessage("system", "You are a programming assistant"),
                            ChatMessage("user", "Write a Python function `add(a, b)`: Return the sum of two numbers.")])
    new = midfill.generate(model, ids, max_new_tokens=40, stop_ids=[tok.eot_id, tok.empty_output_id])
    assert len(new) > 0 and tok.decode(new).strip()


def test_cli_uses_it_when_no_model_is_given(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "midfill.cli", "complete", "--prefix", "import os\n\ndef main():\n    ",
                           "--max-tokens", "16"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "prompt tokens" in proc.stderr
