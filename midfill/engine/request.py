"""The one internal request type every protocol is translated into, and what comes back."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from midfill.engine.sampling import SamplingParams
from midfill.engine.stops import StopRules


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    rules: StopRules = field(default_factory=StopRules)
    stop_ids: frozenset[int] = frozenset({0})
    # A time budget: once this long has passed since the first token and a newline has been
    # generated, stop (an editor would rather have a few lines now than many later).
    ms_after_first_token: float | None = None
    serial_group: int | None = None  # requests of one group run one after another, in the order they came
    cache_prompt: bool = True  # reuse cached KV of earlier prompts, and offer this one's to later requests
    speculate: bool = True  # verify prompt-lookup drafts where they pay (engine/speculate.py); same output either way
    # Token healing (engine/healing.py): the same prompt without the prefix's last token, used
    # when the model's own next token would have merged with that token.
    healed_prompt_ids: list[int] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "eos", "stop" (a stop rule or string), "length", "time" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    prompt_ms: float
    predicted_ms: float
    ttft_ms: float = 0.0  # from submission to the first sampled token
    stopping_word: str = ""  # the stop string that ended the text, if one did
    token_ids: list[int] = field(default_factory=list)  # the generated ids, without the stop id
    drafted_tokens: int = 0  # prompt-lookup tokens verified, and how many of them were kept
    accepted_tokens: int = 0

    @classmethod
    def empty(cls, request: "GenerationRequest", reason: str) -> "GenerationResult":
        return cls("", reason, len(request.prompt_ids), 0, 0, 0.0, 0.0)


@dataclass
class TextDelta:
    text: str


@dataclass
class Finished:
    result: GenerationResult
