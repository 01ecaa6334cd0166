"""Bad input gets a clear 4xx in the calling protocol's error schema, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from midfill.server.background import running_server
from tests.helpers import tiny_model

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json", **AUTH}


@pytest.fixture(scope="module")
def url(small_tokenizer):
    with running_server(tiny_model(seed=6), small_tokenizer, api_key=KEY, max_body_bytes=4096) as (base, _):
        yield base


def openai_message(response: httpx.Response) -> str:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["message"]


def llama_message(response: httpx.Response) -> str:
    error = response.json()["error"]
    assert error["code"] == response.status_code and "type" in error
    return error["message"]


def refact_message(response: httpx.Response) -> str:
    return response.json()["detail"]


CASES = [
    # (path, body bytes, status, words in the message)
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", b'{"prompt": 5}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -5}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000000}', 400, "context"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 7}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "' + b"word " * 600 + b'"}', 400, "leaves in the context"),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 3}', 400, "logprobs"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', 400, "role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "assistant", "content": "hi"}]}', 400, "end with a user message"),
    ("/infill", b"{not json", 400, "not valid JSON"),
    ("/infill", b'{"input_prefix": ["a"]}', 400, "input_prefix"),
    ("/infill", b'{"input_prefix": "x", "n_predict": -7}', 400, "n_predict"),
    ("/infill", b'{"input_prefix": "x", "n_predict": 99999}', 400, "context"),
    ("/infill", b'{"input_prefix": "x", "top_p": 3}', 400, "top_p"),
    ("/infill", b'{"input_prefix": "x", "n_predict": -2}', 400, "n_predict"),
    ("/completion", b'{"prompt": ""}', 400, "empty"),
    ("/completion", b'{"prompt": [1, 2, 99999]}', 400, "token ids"),
    ("/v1/code-completion", b'{"inputs": {"sources": {}}}', 400, "inputs.cursor"),
    ("/v1/code-completion", b'{"inputs": {"sources": {"a": "x"}, "cursor": {"file": "a", "line": 0, "character": 0}, '
                            b'"multiline": true}, "colour": "red"}', 400, "unknown field 'colour'"),  # Refact stays strict
    ("/v1/code-completion", b'{"inputs": {"sources": {"a": "x"}, "cursor": {"file": "a", "line": -1, "character": 0}, "multiline": true}}', 400, "cursor.line"),
]


def message_of(path: str, response: httpx.Response) -> str:
    if path in ("/infill", "/completion"):
        return llama_message(response)
    if path in ("/v1/code-completion", "/refact-caps"):
        return refact_message(response)
    return openai_message(response)


@pytest.mark.parametrize(("path", "body", "status", "words"), CASES)
def test_bad_input_gets_a_clear_error(url, path, body, status, words):
    response = httpx.post(url + path, content=body, headers=JSON)
    assert response.status_code == status, response.text
    message = message_of(path, response)
    assert words in message and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("path", ["/v1/completions", "/infill", "/v1/code-completion"])
def test_body_over_the_limit_is_413(url, path):
    big = b'{"prompt": "' + b"x" * 5000 + b'"}'
    assert httpx.post(url + path, content=big, headers=JSON).status_code == 413

    def chunked():
        yield big  # no Content-Length: the limit is enforced while reading

    response = httpx.post(url + path, content=chunked(), headers=JSON)
    assert response.status_code == 413 and "limit of 4096 bytes" in message_of(path, response)


@pytest.mark.parametrize("path", ["/v1/completions", "/infill", "/v1/code-completion", "/refact-caps", "/metrics"])
def test_missing_or_wrong_api_key_is_401(url, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.request("GET" if path in ("/refact-caps", "/metrics") else "POST", url + path, json={}, headers=headers)
        assert response.status_code == 401
        assert "API key" in message_of(path, response)


def test_health_needs_no_key_and_other_keys_work(url):
    assert httpx.get(url + "/health").status_code == 200
    response = httpx.post(url + "/infill", json={"input_prefix": "x", "n_predict": 2}, headers={"x-api-key": KEY})
    assert response.status_code == 200


def test_server_still_serves_after_bad_input(url):
    for path, body, *_ in CASES:
        httpx.post(url + path, content=body, headers=JSON)
    response = httpx.post(url + "/v1/completions", json={"prompt": "ok", "max_tokens": 3}, headers=AUTH)
    assert response.status_code == 200 and len(response.json()["choices"]) == 1


def test_metrics_exposition(url):
    httpx.post(url + "/infill", json={"input_prefix": "x", "n_predict": 2}, headers=AUTH)
    text = httpx.get(url + "/metrics", headers=AUTH).text
    for name in ("midfill_requests_total", "midfill_time_to_first_token_seconds_bucket", "midfill_request_duration_seconds_bucket",
                 "midfill_prompt_tokens_total", "midfill_completion_tokens_total", "midfill_prefix_cache_hit_tokens_total",
                 "midfill_queue_depth", "midfill_cancelled_requests_total"):
        assert name in text
    assert 'midfill_requests_total{route="/infill",status="200"}' in text
    assert 'status="401"' in text or 'status="400"' in text


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "colour": "red", "samplers": ["min_p"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "colour": 1}], "max_tokens": 2, "min_p": 0.1}),
    ("/infill", {"input_prefix": "x", "n_predict": 2, "model": "", "bogus": 1, "input_extra": [{"text": "y", "mood": 2}]}),
    ("/completion", {"prompt": "x", "n_predict": 2, "mirostat": 2}),
])
def test_unknown_fields_are_ignored_and_named_where_the_original_is_lenient(url, path, body):
    response = httpx.post(url + path, json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    named = set(response.headers["x-midfill-ignored-fields"].split(", "))
    unknown = {k for k in body if k not in ("prompt", "max_tokens", "messages", "input_prefix", "n_predict", "input_extra")}
    assert unknown <= named
    if path == "/infill":
        assert "input_extra.mood" in named
    if path == "/v1/chat/completions":
        assert "messages.colour" in named
