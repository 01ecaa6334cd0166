"""llama.cpp's server protocol: /infill (llama.vim, llama.vscode), /completion and /health.

Differences from llama.cpp, on purpose:
- /infill appends `prompt` (the typed part of the cursor line) to `input_prefix` instead of
  placing it after <fim_middle>: Refact models were trained with the whole line in the prefix.
- `input_extra` chunks go before the FIM prompt as "\\n\\n--- snippet ---\\n\\n{text}", llama.cpp's
  format for models without repository tokens; the oldest chunks are dropped first to fit.
- `tokens_cached` counts prompt tokens whose KV was reused from earlier requests.
- Fields midfill does not use (other samplers, `model`, `n_cmpl`, ...) are ignored and named in
  the `X-Midfill-Ignored-Fields` header (server/lenient.py); `n_probs` > 0 is refused.
- Requests on one `id_slot` run one after another, as in llama.cpp; they share the prefix cache
  with every other request rather than one slot's KV.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from midfill.engine.request import GenerationRequest, GenerationResult
from midfill.engine.sampling import SamplingParams
from midfill.engine.stops import StopRules
from midfill.errors import MidfillError
from midfill.prompts import fim_prompt_healed
from midfill.server.bridge import ENGINE_FAILED, EngineCall, StreamFormat, stream_response
from midfill.server.checks import answer_length, check_token_ids, prompt_budget, stop_strings
from midfill.server.lenient import LenientModel, note_unknown_fields
from midfill.server.state import ServerState, get_state

router = APIRouter()
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"


def error_body(status: int, message: str) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            503: "unavailable_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"code": status, "message": message, "type": kind}}


class CompletionRequest(LenientModel):
    prompt: str | list[int] = ""
    n_predict: int | None = Field(None, ge=-1)  # -1: until the context ends; None: up to --max-tokens
    temperature: float = Field(0.8, ge=0, le=10)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0)
    seed: int = -1
    stop: list[str] = []
    stream: bool = False
    cache_prompt: bool = True
    id_slot: int = -1  # requests on one slot run one after another, as in llama.cpp
    speculate: bool = True  # midfill's: prompt-lookup drafts where they pay (same output either way)
    n_indent: int = Field(0, ge=0)
    t_max_predict_ms: int = Field(0, ge=0)
    response_fields: list[str] | None = None
    n_probs: int = 0
    n_cmpl: int = Field(1, ge=1, le=16)  # completions of the one prompt: more than one answer as a list


class ExtraChunk(LenientModel):
    text: str
    filename: str = "tmp"
    time: Any = None  # llama.vim sends when it saw the chunk


class InfillRequest(CompletionRequest):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = []


def sampling(body: CompletionRequest, index: int) -> SamplingParams:
    if body.n_probs > 0:
        raise MidfillError("n_probs is not supported by this server; leave it at 0")
    seed = None if body.seed < 0 else body.seed + index  # several completions must differ, yet repeat
    return SamplingParams(body.temperature, body.top_k, body.top_p, body.repeat_penalty, seed)


def extra_context(state: ServerState, chunks: list[ExtraChunk], n_prompt: int, budget: int) -> list[int]:
    """The newest `input_extra` chunks that fit beside a prompt of n_prompt tokens, as ids to put first."""
    extra: list[int] = []
    for chunk in reversed(chunks):  # the newest chunks are last; keep those
        if len(chunk.text) > budget * state.tok.max_token_chars:
            break  # could not fit whatever it tokenizes to
        chunk_ids = state.tok.encode(SNIPPET_SEPARATOR + chunk.text)
        if len(extra) + len(chunk_ids) + n_prompt > budget:
            break
        extra = chunk_ids + extra
    return extra


def generations(body: CompletionRequest, state: ServerState, ids: list[int], rules: StopRules,
                healed: list[int] | None = None) -> list[GenerationRequest]:
    """The n_cmpl generations of one prompt; only the first waits for its slot (llama.cpp gives each its own)."""
    return [
        GenerationRequest(
            ids,
            answer_length(body.n_predict, len(ids), state.ctx, state.settings.max_new_tokens),
            sampling(body, index),
            rules,
            frozenset({state.tok.eot_id}),
            ms_after_first_token=body.t_max_predict_ms or None,  # llama.cpp's name
            serial_group=None if body.id_slot < 0 or index > 0 else body.id_slot,
            cache_prompt=body.cache_prompt,
            healed_prompt_ids=healed,
            speculate=body.speculate,
        )
        for index in range(body.n_cmpl)
    ]


def infill_prompt(body: InfillRequest, state: ServerState, budget: int) -> tuple[list[int], list[int] | None]:
    """The FIM prompt's ids after the extra context, and the same for its healed form (or None)."""
    prefix = body.input_prefix + body.prompt if isinstance(body.prompt, str) else body.input_prefix
    ids, healed = fim_prompt_healed(state.tok, prefix, body.input_suffix, state.settings.fim_order, budget,
                                    state.settings.token_healing)
    extra = extra_context(state, body.input_extra, len(ids), budget)
    return extra + ids, None if healed is None else extra + healed


@router.post("/infill")
async def infill(body: InfillRequest, http: Request, state: ServerState = Depends(get_state)):
    note_unknown_fields(http, body, state.logged_fields)
    budget = prompt_budget(body.n_predict, state.ctx, "n_predict")
    rules = StopRules(stop_strings(body.stop), min_indent=body.n_indent or None,
                      suffix_start=state.settings.overlap_window(body.input_suffix))
    ids, healed = await run_in_threadpool(infill_prompt, body, state, budget)  # tokenizing can take a while
    return await respond(body, http, state, generations(body, state, ids, rules, healed), "/infill", truncated=False)


def completion_prompt(body: CompletionRequest, state: ServerState, budget: int) -> tuple[list[int], bool]:
    """The prompt's ids, keeping its end if it is over budget (as llama.cpp does), and whether it was cut."""
    if isinstance(body.prompt, str):
        # only the end is kept, and no token covers more than max_token_chars: the rest need not be tokenized
        ids = state.tok.encode_with_special(body.prompt[-(budget + 1) * state.tok.max_token_chars :])
        truncated = len(ids) > budget or len(body.prompt) > (budget + 1) * state.tok.max_token_chars
    else:
        ids = list(body.prompt)
        truncated = len(ids) > budget
    return check_token_ids(ids, state.tok.vocab_size)[-budget:], truncated


@router.post("/completion")
@router.post("/completions")
async def completion(body: CompletionRequest, http: Request, state: ServerState = Depends(get_state)):
    note_unknown_fields(http, body, state.logged_fields)
    budget = prompt_budget(body.n_predict, state.ctx, "n_predict")
    rules = StopRules(stop_strings(body.stop))
    ids, truncated = await run_in_threadpool(completion_prompt, body, state, budget)
    return await respond(body, http, state, generations(body, state, ids, rules), "/completion", truncated)


def final_body(body: CompletionRequest, state: ServerState, result: GenerationResult, truncated: bool, content: str,
               index: int = 0) -> dict:
    stop_type = {"eos": "eos", "length": "limit", "time": "limit", "cancelled": "none"}.get(
        result.finish_reason, "word" if result.stopping_word else "limit"
    )
    prompt_n = result.prompt_tokens - result.cached_tokens
    return {
        "index": index,
        "content": content,
        "tokens": [],
        "id_slot": body.id_slot,
        "stop": True,
        "model": state.settings.model_name,
        "tokens_predicted": result.completion_tokens,
        "tokens_evaluated": result.prompt_tokens,
        "generation_settings": {"n_predict": -1 if body.n_predict is None else body.n_predict, "temperature": body.temperature, "top_k": body.top_k,
                                "top_p": body.top_p, "seed": body.seed, "n_ctx": state.ctx},
        "has_new_line": "\n" in result.text,
        "truncated": truncated,
        "stop_type": stop_type,
        "stopping_word": result.stopping_word,
        "tokens_cached": result.cached_tokens,
        "timings": {
            "prompt_n": prompt_n,
            "prompt_ms": result.prompt_ms,
            "prompt_per_token_ms": result.prompt_ms / max(prompt_n, 1),
            "prompt_per_second": 1000 * prompt_n / max(result.prompt_ms, 1e-6),
            "predicted_n": result.completion_tokens,
            "predicted_ms": result.predicted_ms,
            "predicted_per_token_ms": result.predicted_ms / max(result.completion_tokens, 1),
            "predicted_per_second": 1000 * result.completion_tokens / max(result.predicted_ms, 1e-6),
        },
    }


def pick_fields(data: dict, paths: list[str] | None) -> dict:
    """llama.cpp's response_fields: only the named paths, flattened with the path as key ("timings/prompt_n")."""
    if not paths:
        return data
    picked = {}
    for path in paths:
        value: Any = data
        for part in path.split("/"):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            picked[path] = value
    return picked


async def respond(body: CompletionRequest, http: Request, state: ServerState, requests: list[GenerationRequest], route: str,
                  truncated: bool):
    call = EngineCall(state.engine, state.metrics, route, requests)

    def final(index: int, result: GenerationResult, content: str) -> dict:
        return pick_fields(final_body(body, state, result, truncated, content, index), body.response_fields)

    if body.stream:
        return stream_response(call, StreamFormat(
            delta=lambda index, text: {"index": index, "content": text, "tokens": [], "stop": False, "id_slot": body.id_slot},
            finished=lambda index, result: final(index, result, ""),
            failed=error_body(500, ENGINE_FAILED),  # what llama.cpp streams when a slot fails
        ))
    results = await call.finished(http)
    finals = [final(i, r, r.text) for i, r in enumerate(results)]
    return finals[0] if len(finals) == 1 else finals


@router.get("/health")
@router.get("/v1/health")
async def health(state: ServerState = Depends(get_state)):
    if not state.engine.alive:
        return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
    return {"status": "ok"}
