"""Small builders the tests share: tiny random models and a corpus that every machine has."""

from __future__ import annotations

import subprocess
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from midfill.model import GPTRefactForCausalLM, RefactConfig


def tiny_config(**overrides) -> RefactConfig:
    sizes = dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256, torch_dtype="float32")
    return RefactConfig(**{**sizes, **overrides})


def tiny_model(seed: int = 0, **overrides) -> GPTRefactForCausalLM:
    torch.manual_seed(seed)
    model = GPTRefactForCausalLM(tiny_config(**overrides))
    with torch.no_grad():  # LayerNorm weights away from 1 so a wrong norm would show
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model.eval()


def stdlib_texts(limit: int = 40) -> list[str]:
    """Python standard library sources: a corpus present on every machine."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"))[:limit]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def score_samples(folder: Path, rows: list[dict]) -> dict:
    """`midfill eval score` on rows written to folder/samples.jsonl: its pass@k summary."""
    import json

    from typer.testing import CliRunner

    from midfill.cli import app

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["eval", "score", str(path), "--workers", "2"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextmanager
def serve_subprocess(folder: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """A real `python -m midfill serve` (the embedded model) on a free loopback port, up and healthy:
    (base URL, process, log file). Killed when the block ends, if it still runs."""
    import os
    import sys
    import time

    import httpx

    from midfill.server.background import free_port

    port = free_port()
    base, log = f"http://127.0.0.1:{port}", folder / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf")}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "midfill", "serve", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=folder, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, f"server did not come up:\n{log.read_text()}"
            time.sleep(0.1)
        yield base, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def rounded_per_group(x: torch.Tensor) -> torch.Tensor:
    """x rounded as decode.c's int4 path rounds activations: int8 codes, one scale per group of 32 values."""
    groups = x.view(*x.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    codes = torch.round(groups * torch.where(amax > 0, 127 / amax, 0))
    return (codes * (amax / 127)).view(x.shape)
