"""A real server on a free loopback port, in a thread of this process: for tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from midfill.engine.scheduler import Engine
from midfill.model import GPTRefactForCausalLM
from midfill.server.app import create_app
from midfill.server.listener import server_config
from midfill.server.state import ServerSettings
from midfill.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    model: GPTRefactForCausalLM,
    tok: Tokenizer,
    name: str = "tiny",
    api_key: str | None = None,
    max_body_bytes: int = 8 * 2**20,
    finetune_run: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
    token_healing: bool = True,
    cut_suffix_overlap: bool = True,
    **engine_options,
) -> Iterator[tuple[str, Engine]]:
    """Yield (base_url, engine) while a uvicorn server runs the app in a background thread."""
    engine = Engine(model, tok, **engine_options)
    settings = ServerSettings(model_name=name, api_key=api_key, max_body_bytes=max_body_bytes, finetune_run=finetune_run,
                              allowed_hosts=allowed_hosts, token_healing=token_healing,
                              cut_suffix_overlap=cut_suffix_overlap)
    port = free_port()
    server = uvicorn.Server(server_config(create_app(engine, tok, settings), "127.0.0.1", port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the background server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
