"""What every route needs: the engine, tokenizer, metrics and server settings."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

from fastapi import Request
from pydantic import BaseModel, ConfigDict

from midfill.engine.scheduler import Engine
from midfill.engine.stops import suffix_window
from midfill.model.precision import describe
from midfill.server.metrics import Metrics
from midfill.tokenizer import Tokenizer


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    fim_order: str = "spm"
    max_body_bytes: int = 8 * 2**20
    finetune_run: str | None = None  # a `midfill finetune` output folder whose progress the status page shows
    host: str = "127.0.0.1"  # the address served on; its name is accepted in Host headers
    allowed_hosts: tuple[str, ...] = ()  # more names accepted in Host headers ("*": any)
    token_healing: bool = True  # FIM prompts ending inside a token are healed (engine/healing.py)
    cut_suffix_overlap: bool = True  # a FIM answer's end that repeats the suffix's start is cut
    max_new_tokens: int = 512  # the answer's cap when a request leaves its length open

    def overlap_window(self, suffix: str) -> str:
        """The suffix window that completions are compared with, or "" when overlap cutting is off."""
        return suffix_window(suffix) if self.cut_suffix_overlap else ""
    started: int = field(default_factory=lambda: int(time.time()))


@dataclass
class ServerState:
    engine: Engine
    tok: Tokenizer
    metrics: Metrics
    settings: ServerSettings
    logged_fields: set[tuple[str, str]] = field(default_factory=set)  # (route, ignored field) already logged

    @property
    def ctx(self) -> int:
        return self.engine.ctx

    @functools.cached_property
    def path(self) -> dict[str, str]:
        """Which weights, decode and prefill path the model runs, and why (midfill.model.precision)."""
        return describe(self.engine.model)


def get_state(request: Request) -> ServerState:
    return request.app.state.midfill


class WireModel(BaseModel):
    """A request body that mirrors a wire protocol: unknown fields are an error, not ignored."""

    model_config = ConfigDict(extra="forbid")
