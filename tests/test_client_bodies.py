"""The request bodies llama.vim and llama.vscode send, replayed: each is answered 200 with every field its client reads.

The bodies are in tests/fixtures/clients, one file per body, written from the clients' sources (each names the file,
commit and lines it follows). Reads are "/" paths into the answer ("choices/0/message/content"), except where the body
asks llama.cpp's /infill or /completion for `response_fields`: llama.cpp then answers with those keys only, nested ones
flattened under their path ("timings/prompt_n" is one key), and that is how the client looks them up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from midfill.server.background import running_server
from tests.helpers import tiny_model

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "clients").glob("*.json"))


@pytest.fixture(scope="module")
def server(small_tokenizer):
    # a context of 1024 holds llama.vim's instruction prompt; bodies asking for "until the context ends" stay quick
    with running_server(tiny_model(seed=5, n_positions=1024), small_tokenizer) as (url, _):
        yield url


def found(answer: Any, path: str) -> bool:
    for part in path.split("/"):
        if isinstance(answer, dict) and part in answer:
            answer = answer[part]
        elif isinstance(answer, list) and part.isdigit() and int(part) < len(answer):
            answer = answer[int(part)]
        else:
            return False
    return True


def flattened(case: dict) -> bool:
    return "response_fields" in case["body"] and not case["route"].startswith("/v1/")


def answers(response: httpx.Response, streamed: bool) -> list[Any]:
    """Every object the client parses: the SSE events when streamed, else the body (or each item of an array,
    which is how llama.cpp answers n_cmpl > 1)."""
    if streamed:
        lines = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        return [json.loads(line) for line in lines if line != "[DONE]"]
    data = response.json()
    return data if isinstance(data, list) else [data]


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_client_body_is_answered_with_what_the_client_reads(server, fixture: Path):
    case = json.loads(fixture.read_text())
    streamed = bool(case["body"].get("stream"))
    response = httpx.post(server + case["route"], json=case["body"], timeout=60)
    assert response.status_code == 200, f"{response.status_code} {response.text}"

    objects = answers(response, streamed)
    assert objects, "no answer to read"
    if flattened(case):
        assert all(set(o) <= set(case["body"]["response_fields"]) for o in objects), objects
        missing = [r for r in case["reads"] if not all(r in o for o in objects)]
    elif streamed:  # the client accumulates over the events: each field must come in at least one
        missing = [r for r in case["reads"] if not any(found(o, r) for o in objects)]
    else:
        missing = [r for r in case["reads"] if not all(found(o, r) for o in objects)]
    assert not missing, f"{case['client']} reads {missing}, absent from {objects}"


def test_every_fixture_names_its_client_source_route_body_and_reads():
    assert len(FIXTURES) >= 10
    for fixture in FIXTURES:
        case = json.loads(fixture.read_text())
        assert {"client", "source", "route", "body", "reads"} <= set(case), fixture.name
        assert case["route"] in ("/infill", "/completion", "/v1/completions", "/v1/chat/completions"), fixture.name
