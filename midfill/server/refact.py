"""Refact's protocol: the caps document refact-lsp reads, its tokenizer and telemetry routes, and
the plugin route /v1/code-completion that builds the FIM prompt server-side.

refact-lsp itself completes through /v1/completions (see openai.py) with prompts it builds from
the caps' FIM-SPM scratchpad; /v1/code-completion takes the file and a cursor instead.
"""

from __future__ import annotations

import itertools
import time

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from midfill.engine.request import GenerationRequest
from midfill.engine.sampling import SamplingParams
from midfill.engine.stops import StopRules
from midfill.errors import MidfillError
from midfill.prompts import cursor_indent, fim_prompt_healed
from midfill.server.bridge import ENGINE_FAILED, EngineCall, StreamFormat, finish_reason, stream_response
from midfill.server.checks import prompt_budget, stop_strings
from midfill.server.state import ServerState, WireModel, get_state

router = APIRouter()
telemetry_ids = itertools.count(1)


def error_body(status: int, message: str) -> dict:
    return {"detail": message}


def caps(state: ServerState) -> dict:
    name, tok = state.settings.model_name, state.tok
    scratchpad = {
        "fim_prefix": tok.token_text(tok.fim_prefix_id),
        "fim_suffix": tok.token_text(tok.fim_suffix_id),
        "fim_middle": tok.token_text(tok.fim_middle_id),
        "eot": tok.token_text(tok.eot_id),
    }
    scratchpad_name = "FIM-SPM" if state.settings.fim_order == "spm" else "FIM-PSM"
    return {
        "cloud_name": "midfill",
        "endpoint_style": "openai",
        "endpoint_template": "/v1/completions",
        "endpoint_chat_passthrough": "/v1/chat/completions",
        "tokenizer_path_template": "/tokenizer/$MODEL",
        "tokenizer_rewrite_path": {},
        "telemetry_basic_dest": "/stats/telemetry-basic",
        "telemetry_corrected_snippets_dest": "/stats/telemetry-snippets",
        "running_models": [name],
        "code_completion_default_model": name,
        "code_chat_default_model": name,
        "code_completion_n_ctx": state.ctx,
        "code_completion_models": {
            name: {
                "n_ctx": state.ctx,
                "supports_scratchpads": {scratchpad_name: scratchpad},
                "default_scratchpad": scratchpad_name,
                "similar_models": [],
            }
        },
        "code_chat_models": {
            name: {"n_ctx": state.ctx, "supports_scratchpads": {"PASSTHROUGH": {}}, "default_scratchpad": "PASSTHROUGH", "similar_models": []}
        },
        "caps_version": state.settings.started,
    }


@router.get("/refact-caps")
@router.get("/coding_assistant_caps.json")
async def refact_caps(state: ServerState = Depends(get_state)):
    return caps(state)


@router.get("/tokenizer/{model:path}")
async def tokenizer_json(model: str, state: ServerState = Depends(get_state)):
    if model != state.settings.model_name:
        raise HTTPException(404, f"no model {model!r} here; this server runs {state.settings.model_name!r}")
    return Response(state.tok.to_json(), media_type="application/json")


@router.post("/stats/telemetry-basic")
@router.post("/stats/telemetry-snippets")
async def telemetry(request: Request):
    """Plugins report usage here; midfill keeps nothing, but answers so they don't log errors."""
    return {"retcode": "OK"}


class Cursor(WireModel):
    file: str
    line: int = Field(ge=0)  # 0-based
    character: int = Field(ge=0)  # 0-based, in Unicode characters


class CodeInputs(WireModel):
    sources: dict[str, str]
    cursor: Cursor
    multiline: bool


class CodeParameters(WireModel):
    temperature: float | None = Field(None, ge=0, le=2)
    max_new_tokens: int = Field(0, ge=0)  # 0 means the default, 50
    top_p: float | None = Field(None, gt=0, le=1)
    stop: list[str] = []


class CodeCompletionRequest(WireModel):
    inputs: CodeInputs
    parameters: CodeParameters = CodeParameters()
    model: str = ""
    scratchpad: str = ""
    stream: bool = False
    no_cache: bool = False
    speculate: bool = True  # midfill's: prompt-lookup drafts where they pay (same output either way)
    use_ast: bool = False
    use_vecdb: bool = False
    rag_tokens_n: int = 0


def split_at_cursor(inputs: CodeInputs) -> tuple[str, str]:
    cursor = inputs.cursor
    if cursor.file not in inputs.sources:
        raise MidfillError(f"cursor.file {cursor.file!r} is not one of the sources")
    text = inputs.sources[cursor.file]
    lines = text.split("\n")
    if cursor.line >= len(lines):
        raise MidfillError(f"cursor.line {cursor.line} is past the end of {cursor.file} ({len(lines)} lines, 0-based)")
    if cursor.character > len(lines[cursor.line]):
        raise MidfillError(f"cursor.character {cursor.character} is past the end of line {cursor.line}")
    offset = sum(len(line) + 1 for line in lines[: cursor.line]) + cursor.character
    return text[:offset], text[offset:]


@router.post("/v1/code-completion")
async def code_completion(body: CodeCompletionRequest, http: Request, state: ServerState = Depends(get_state)):
    params = body.parameters
    n_new = params.max_new_tokens or 50
    budget = prompt_budget(n_new, state.ctx, "max_new_tokens")
    prefix, suffix = split_at_cursor(body.inputs)
    ids, healed = await run_in_threadpool(fim_prompt_healed, state.tok, prefix, suffix, state.settings.fim_order,
                                          budget, state.settings.token_healing)
    mode = "multi-line" if body.inputs.multiline else "single-line"
    request = GenerationRequest(
        ids,
        n_new,
        SamplingParams(temperature=0.2 if params.temperature is None else params.temperature, top_p=params.top_p or 1.0),
        StopRules.for_mode(mode, cursor_indent(prefix), stop_strings(params.stop), state.settings.overlap_window(suffix)),
        frozenset({state.tok.eot_id}),
        cache_prompt=not body.no_cache,
        healed_prompt_ids=healed,
        speculate=body.speculate,
    )
    call = EngineCall(state.engine, state.metrics, "/v1/code-completion", [request])
    base = {"snippet_telemetry_id": next(telemetry_ids), "model": state.settings.model_name, "created": time.time()}

    def choice(text: str, reason: str | None) -> dict:
        return {**base, "choices": [{"index": 0, "code_completion": text, "finish_reason": reason}]}

    if body.stream:
        return stream_response(call, StreamFormat(
            delta=lambda index, text: choice(text, None),
            finished=lambda index, result: choice("", finish_reason(result)),
            failed=error_body(500, ENGINE_FAILED),  # refact-lsp reads "detail" as an error
            tail=lambda results: ["[DONE]"],
        ))
    result = (await call.finished(http))[0]
    return choice(result.text, finish_reason(result))
