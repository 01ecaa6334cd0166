"""OpenAI-compatible API: /v1/completions (with FIM via `suffix`), /v1/chat/completions, /v1/models.

A prompt without `suffix` is used as given, special tokens included (refact-lsp and Continue
build FIM prompts client-side). With `suffix`, the server builds the FIM prompt in its own order
(SPM by default) and trims prefix and suffix to fit. A raw prompt that does not fit the context
with `max_tokens` is a 400, as with OpenAI.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from midfill.engine.request import GenerationRequest, GenerationResult
from midfill.engine.sampling import SamplingParams
from midfill.engine.stops import StopRules
from midfill.errors import MidfillError
from midfill.prompts import ChatMessage, chat_prompt, fim_prompt_healed
from midfill.server.bridge import ENGINE_FAILED, EngineCall, StreamFormat, finish_reason, stream_response
from midfill.server.checks import answer_length, check_token_ids, prompt_budget, stop_strings
from midfill.server.lenient import LenientModel, note_unknown_fields
from midfill.server.state import ServerState, get_state

router = APIRouter()


def error_body(status: int, message: str) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class GenerationFields(LenientModel):
    """What both OpenAI routes take: the answer's length and sampling, plus llama.cpp's own fields,
    which its clients send to these routes too and which midfill honours."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=-1)  # -1: until the context ends, as llama.cpp; None: up to --max-tokens
    max_completion_tokens: int | None = Field(None, ge=-1)  # what newer refact-lsp sends
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # Accepted so that clients which send their defaults work; anything but the default is a 400.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    meta: dict | None = None  # refact-lsp's request metadata
    # llama.cpp's
    n_predict: int | None = Field(None, ge=-1)  # used when max_tokens is not given
    top_k: int = Field(0, ge=0)
    repeat_penalty: float = Field(1.0, gt=0)
    cache_prompt: bool = True
    id_slot: int = -1  # requests on one slot run one after another
    speculate: bool = True  # midfill's: prompt-lookup drafts where they pay (same output either way)


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class ContentPart(LenientModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(LenientModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    logprobs: bool | None = None


def reject_unsupported(body: GenerationFields) -> None:
    if body.logprobs:
        raise MidfillError("logprobs is not supported by this server; leave it out")
    if getattr(body, "best_of", None) not in (None, 1):
        raise MidfillError("best_of is not supported by this server; use n")
    if body.presence_penalty or body.frequency_penalty:
        raise MidfillError("presence_penalty and frequency_penalty are not supported; leave them at 0")
    if body.logit_bias:
        raise MidfillError("logit_bias is not supported by this server")


def requested_tokens(body: GenerationFields) -> int | None:
    """The answer length asked for (None: left open), under whichever name the client used."""
    for value in (body.max_completion_tokens, body.max_tokens, body.n_predict):
        if value is not None:
            return value
    return None


def generation(state: ServerState, body: GenerationFields, ids: list[int], choice: int,
               rules: StopRules, stop_ids: frozenset[int], healed: list[int] | None = None) -> GenerationRequest:
    n_new = answer_length(requested_tokens(body), len(ids), state.ctx, state.settings.max_new_tokens)
    return GenerationRequest(ids, n_new, sampling(body, choice), rules, stop_ids, cache_prompt=body.cache_prompt,
                             serial_group=None if body.id_slot < 0 else body.id_slot, healed_prompt_ids=healed,
                             speculate=body.speculate)


def sampling(body: GenerationFields, choice: int) -> SamplingParams:
    seed = None if body.seed is None else body.seed + choice  # n samples must differ, yet repeat
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(temperature, body.top_k, 1.0 if body.top_p is None else body.top_p, body.repeat_penalty, seed)


def completion_prompts(state: ServerState, body: CompletionRequest, budget: int) -> list[tuple[list[int], str, list[int] | None]]:
    """Token ids, echo text and healed ids (prompts.fim_prompt_healed) of each prompt in the request."""
    prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) else [body.prompt]
    out = []
    for prompt in prompts:
        if isinstance(prompt, list):
            ids, text, healed = check_token_ids(list(prompt), state.tok.vocab_size), state.tok.decode(prompt), None
        elif body.suffix is not None:
            ids, healed = fim_prompt_healed(state.tok, prompt, body.suffix, state.settings.fim_order, budget,
                                            state.settings.token_healing)
            text = prompt
        else:
            if len(prompt) > budget * state.tok.max_token_chars:  # too long whatever it tokenizes to
                raise MidfillError(f"the prompt is over {budget} tokens, the room that max_tokens leaves in the "
                                   f"context of {state.ctx} tokens; shorten the prompt or lower max_tokens")
            ids, text, healed = state.tok.encode_with_special(prompt), prompt, None
        if not ids:
            raise MidfillError("prompt is empty")
        if len(ids) > budget:
            raise MidfillError(
                f"the prompt is {len(ids)} tokens, over the {budget} that max_tokens leaves in the context of "
                f"{state.ctx} tokens; shorten the prompt or lower max_tokens"
            )
        out.append((ids, text, healed))
    return out


def usage(results: list[GenerationResult]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request, state: ServerState = Depends(get_state)):
    reject_unsupported(body)
    note_unknown_fields(http, body, state.logged_fields)
    budget = prompt_budget(requested_tokens(body), state.ctx)
    rules = StopRules(stop_strings(body.stop), suffix_start=state.settings.overlap_window(body.suffix or ""))
    prompts = await run_in_threadpool(completion_prompts, state, body, budget)  # tokenizing can take a while
    stop_ids = frozenset({state.tok.eot_id})
    requests = [generation(state, body, ids, choice, rules, stop_ids, healed) for ids, _, healed in prompts for choice in range(body.n)]
    echo = [text if body.echo else "" for _, text, _ in prompts for _ in range(body.n)]
    call = EngineCall(state.engine, state.metrics, "/v1/completions", requests)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.settings.model_name}

    def chunk(index: int, text: str, reason: str | None) -> dict:
        return {**base, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}

    if body.stream:
        return stream_response(call, StreamFormat(
            delta=lambda index, text: chunk(index, text, None),
            finished=lambda index, result: chunk(index, "", finish_reason(result)),
            failed=error_body(500, ENGINE_FAILED),
            head=[chunk(index, text, None) for index, text in enumerate(echo) if text],
            tail=lambda results: stream_tail(body, base, results),
        ))
    results = await call.finished(http)
    choices = [{"index": i, "text": echo[i] + r.text, "logprobs": None, "finish_reason": finish_reason(r)} for i, r in enumerate(results)]
    return {**base, "choices": choices, "usage": usage(results)}


def stream_tail(body: GenerationFields, base: dict, results: list[GenerationResult]) -> list[dict | str]:
    usage_chunk = [{**base, "choices": [], "usage": usage(results)}] if (body.stream_options or {}).get("include_usage") else []
    return [*usage_chunk, "[DONE]"]


def chat_messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    return [ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: Request, state: ServerState = Depends(get_state)):
    reject_unsupported(body)
    note_unknown_fields(http, body, state.logged_fields)
    budget = prompt_budget(requested_tokens(body), state.ctx)
    rules = StopRules(stop_strings(body.stop), trim_trailing_whitespace=True)
    ids = await run_in_threadpool(chat_prompt, state.tok, chat_messages(body), budget)
    stop_ids = frozenset({state.tok.eot_id, state.tok.empty_output_id})
    requests = [generation(state, body, ids, choice, rules, stop_ids) for choice in range(body.n)]
    call = EngineCall(state.engine, state.metrics, "/v1/chat/completions", requests)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.settings.model_name}

    if body.stream:
        chunk = {**base, "object": "chat.completion.chunk"}
        started = [False] * body.n  # the model answers "ASSISTANT" with a space first

        def delta(index: int, text: str) -> dict | None:
            text = text if started[index] else text.lstrip()
            started[index] = started[index] or bool(text)
            return {**chunk, "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]} if text else None

        return stream_response(call, StreamFormat(
            delta=delta,
            finished=lambda index, result: {**chunk, "choices": [{"index": index, "delta": {}, "finish_reason": finish_reason(result)}]},
            failed=error_body(500, ENGINE_FAILED),
            head=[{**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                  for i in range(body.n)],
            tail=lambda results: stream_tail(body, chunk, results),
        ))
    results = await call.finished(http)
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text.strip()}, "logprobs": None,
                "finish_reason": finish_reason(r)} for i, r in enumerate(results)]
    return {**base, "object": "chat.completion", "choices": choices, "usage": usage(results)}


@router.get("/v1/models")
async def models(state: ServerState = Depends(get_state)):
    name = state.settings.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": state.settings.started, "owned_by": "midfill"}]}
