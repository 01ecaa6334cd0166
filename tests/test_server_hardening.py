"""Hostile requests against the server (issue 15, items 1-10), through the HTTP API of each protocol.

Each gets a clean 4xx in the calling protocol's error schema, or a correct answer; afterwards the
server still answers a plain request correctly; an innocent request running alongside is unharmed;
and a real `midfill serve` process still stops on SIGTERM. Also: hostile names of ignored fields,
which the lenient routes echo in a response header.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from midfill.engine import StopRules, TextAssembler, stream_text
from midfill.engine.sampling import Sampler
from midfill.engine.scheduler import Engine
from midfill.hub import EMBEDDED_MODEL
from midfill.server import llamacpp, openai
from midfill.server.background import running_server
from midfill.server.listener import H11WithHeadDeadline
from tests.helpers import serve_subprocess, tiny_model

KEY = "sekrit"
GREEDY = {"prompt": "def add(a, b):\n    ", "max_tokens": 12, "temperature": 0}  # the innocent and the plain request
SEEDS = [2**64, -(2**63) - 1, 2**64 - 1]
TINY_TEMPERATURES = [1e-39, 1e-45]
GENERATION_ROUTES = ["/v1/completions", "/v1/chat/completions", "/completion", "/infill", "/v1/code-completion"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


@pytest.fixture(scope="module")
def server(model, small_tokenizer):
    with running_server(model, small_tokenizer, max_batch=8) as (url, engine):  # speculating, as served by default
        yield url, engine


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture(scope="module")
def keyed_url(model, small_tokenizer):
    with running_server(model, small_tokenizer, api_key=KEY) as (base, _):
        yield base


@pytest.fixture(scope="module")
def expected(model, small_tokenizer) -> str:
    """What GREEDY must answer: the plain, unserved generation path."""
    assembler = TextAssembler(small_tokenizer, StopRules())
    ids = small_tokenizer.encode(GREEDY["prompt"])
    return "".join(stream_text(model, ids, assembler, GREEDY["max_tokens"], stop_ids={small_tokenizer.eot_id}))


def greedy_text(url: str) -> str:
    response = httpx.post(url + "/v1/completions", json=GREEDY, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def assert_still_serves(url: str, expected: str) -> None:
    """The server answers a plain request correctly, and says it is healthy."""
    assert greedy_text(url) == expected
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def alongside(url: str, hostile):
    """Run `hostile()` while the innocent GREEDY request runs; return (hostile's result, innocent's text)."""
    with ThreadPoolExecutor(2) as pool:
        innocent = pool.submit(greedy_text, url)
        result = pool.submit(hostile)
        return result.result(), innocent.result()


@contextmanager
def batched_together(engine: Engine, n: int):
    """Hold the engine's first forward pass until n requests have been submitted, so that they
    share decode steps; yield a list whose one item becomes the largest batch the model then ran."""
    head, submit = engine.model.lm_head, engine.submit
    forward = head.forward
    peak, submitted = [0], 0
    waited = False

    def counting(*args, **kwargs):
        nonlocal submitted
        submitted += 1
        return submit(*args, **kwargs)

    def gathering(x, *args, **kwargs):
        nonlocal waited
        if not waited:
            waited = True
            deadline = time.monotonic() + 20
            while submitted < n and time.monotonic() < deadline:
                time.sleep(0.001)
        peak[0] = max(peak[0], len(engine.active))  # sequences in the pass (drafted tokens add rows, not sequences)
        return forward(x, *args, **kwargs)

    engine.submit, head.forward = counting, gathering  # the decode step and the full forward both call head.forward
    try:
        yield peak
    finally:
        del engine.submit, head.forward


def post_json(url: str, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, **kwargs)


def openai_message(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]["message"]


def llama_message(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "type"}, body
    assert body["error"]["code"] == response.status_code
    return body["error"]["message"]


def refact_message(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"detail"}, body
    return body["detail"]


def message_of(path: str, response: httpx.Response) -> str:
    """The error message, after checking the body is in the error schema of the path's protocol."""
    if path.startswith(("/completion", "/infill", "/health")):
        return llama_message(response)
    if path.startswith("/v1/code-completion"):
        return refact_message(response)
    return openai_message(response)


def sse(response: httpx.Response) -> list:
    """The data of each server-sent event: parsed JSON, or the bare marker ("[DONE]")."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def code_completion_body(text: str, max_new_tokens: int = 8, **parameters) -> dict:
    return {"inputs": {"sources": {"a.py": text}, "cursor": {"file": "a.py", "line": text.count("\n"), "character": 0},
                       "multiline": True}, "parameters": {"max_new_tokens": max_new_tokens, **parameters}}


def request_body(path: str, prompt: str, n_tokens: int = 8, **fields) -> dict:
    """A request for `path` in its own protocol with `prompt` as the text before the cursor."""
    if path == "/v1/completions":
        return {"prompt": prompt, "max_tokens": n_tokens, **fields}
    if path == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": prompt}], "max_tokens": n_tokens, **fields}
    if path == "/completion":
        return {"prompt": prompt, "n_predict": n_tokens, **fields}
    if path == "/infill":
        return {"input_prefix": prompt, "input_suffix": "\n", "n_predict": n_tokens, **fields}
    return code_completion_body(prompt, n_tokens, **fields)


# --- 1. seeds outside torch's range ---


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("seed", SEEDS)
def test_openai_seed_out_of_range_is_taken_mod_2_64(server, expected, path, seed):
    url, engine = server

    def texts(response: httpx.Response) -> list[str]:
        assert response.status_code == 200, response.text
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        return [c["text"] if "text" in c else c["message"]["content"] for c in choices]

    body = request_body(path, "x = ", 6, temperature=1.0, n=2)
    with batched_together(engine, 3) as peak:
        hostile, innocent = alongside(url, lambda: post_json(url, path, {**body, "seed": seed}))
    assert peak[0] == 3 and innocent == expected
    # choice i is sampled with seed + i: the same as with the seed taken mod 2^64
    assert texts(hostile) == texts(post_json(url, path, {**body, "seed": seed % 2**64}))
    assert_still_serves(url, expected)
    assert engine.alive


def test_openai_seed_choices_wrap_past_2_64(url):
    """n=2 at seed 2^64-1: the second choice's seed is 2^64, which is seed 0."""
    body = {"prompt": "x = ", "max_tokens": 6, "temperature": 1.0}
    wrapped = post_json(url, "/v1/completions", {**body, "n": 2, "seed": 2**64 - 1}).json()["choices"]
    zero = post_json(url, "/v1/completions", {**body, "n": 2, "seed": 0}).json()["choices"]
    assert next(c["text"] for c in wrapped if c["index"] == 1) == next(c["text"] for c in zero if c["index"] == 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_infill_seed_out_of_range(server, expected, seed):
    url, engine = server
    body = {"input_prefix": "x = ", "n_predict": 6, "temperature": 1.0, "cache_prompt": False}
    with batched_together(engine, 2) as peak:
        hostile, innocent = alongside(url, lambda: post_json(url, "/infill", {**body, "seed": seed}))
    assert peak[0] == 2 and innocent == expected
    assert hostile.status_code == 200 and hostile.json()["tokens_predicted"] == 6
    if seed >= 0:  # llama.cpp: a negative seed means a random one
        assert hostile.json()["content"] == post_json(url, "/infill", {**body, "seed": seed % 2**64}).json()["content"]
    assert_still_serves(url, expected)


# --- 2. tiny temperatures ---


def answer(response: httpx.Response) -> dict:
    """A response without the fields that differ between two runs of one request (ids, times, cache use)."""
    varying = ("id", "created", "snippet_telemetry_id", "timings", "generation_settings", "tokens_cached", "usage")
    return {k: v for k, v in response.json().items() if k not in varying}


@pytest.mark.parametrize("path", GENERATION_ROUTES)
@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_tiny_temperature_samples_greedily(server, expected, path, temperature):
    url, engine = server
    body = request_body(path, "import os\n", 8)
    if path == "/v1/code-completion":
        body["parameters"]["temperature"] = 0
        hostile_body = {**body, "parameters": {**body["parameters"], "temperature": temperature}}
    else:
        hostile_body = {**body, "temperature": temperature}
        body = {**body, "temperature": 0}
    with batched_together(engine, 2) as peak:
        hostile, innocent = alongside(url, lambda: post_json(url, path, hostile_body))
    assert peak[0] == 2 and innocent == expected
    greedy = post_json(url, path, body)
    assert hostile.status_code == 200 == greedy.status_code, hostile.text
    assert answer(hostile) == answer(greedy)
    assert_still_serves(url, expected)


def test_small_temperature_and_extreme_repetition_penalties_over_a_long_generation(server, expected):
    """The smallest temperature still sampled, with penalties that rescale the logits more every
    token (each sampled token joins the penalized set): no step may fail, for this row or the batch."""
    url, engine = server
    bodies = [{"prompt": "x", "n_predict": 120, "temperature": 1.01e-6, "repeat_penalty": penalty, "seed": 1,
               "top_k": 0, "top_p": 1.0, "cache_prompt": False} for penalty in (1e-4, 1e4)]
    with batched_together(engine, 3) as peak:
        with ThreadPoolExecutor(3) as pool:
            innocent = pool.submit(greedy_text, url)
            replies = list(pool.map(lambda b: post_json(url, "/completion", b), bodies))
    assert peak[0] == 3 and innocent.result() == expected
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["stop_type"] in ("eos", "limit") and reply.json()["tokens_predicted"] > 0
    assert_still_serves(url, expected)


def test_a_sampling_failure_mid_generation_ends_that_request_alone(server, expected, monkeypatch):
    """What a tiny temperature used to do at its third token: the row fails, the batch goes on."""
    url, engine = server
    real = Sampler.__call__
    batch_at_failure = []

    def overflowing(self, logits, seen=None):
        if self.params.temperature == 0.5:  # the hostile request
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:
                batch_at_failure.append(len(engine.active))
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(self, logits, seen)

    monkeypatch.setattr(Sampler, "__call__", overflowing)
    hostile = {"prompt": "import os\n", "max_tokens": 20, "temperature": 0.5}
    with batched_together(engine, 2):
        failed, innocent = alongside(url, lambda: post_json(url, "/v1/completions", hostile))
    assert batch_at_failure == [2] and innocent == expected
    assert failed.status_code == 500 and openai_message(failed)
    with batched_together(engine, 2):
        streamed, innocent = alongside(url, lambda: post_json(url, "/v1/completions", {**hostile, "stream": True}))
    events = sse(streamed)
    assert innocent == expected
    assert events[-1] == "[DONE]" and set(events[-2]) == {"error"} and events[-2]["error"]["type"] == "server_error"
    assert all(c["finish_reason"] is None for e in events if isinstance(e, dict) and "choices" in e for c in e["choices"])
    monkeypatch.setattr(Sampler, "__call__", real)
    assert_still_serves(url, expected)


# --- 3. stop strings ---


@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_a_hundred_thousand_stop_strings_are_refused(url, expected, path):
    stops = [f"s{i}" for i in range(100_000)]
    body = request_body(path, "x", 4)
    if path == "/v1/code-completion":
        body["parameters"]["stop"] = stops
    else:
        body["stop"] = stops
    hostile, innocent = alongside(url, lambda: post_json(url, path, body))
    assert hostile.status_code == 400 and "at most 32" in message_of(path, hostile)
    assert innocent == expected
    assert_still_serves(url, expected)


@pytest.mark.parametrize("path", ["/completion", "/infill", "/v1/code-completion"])
def test_stop_string_limits_are_exact(url, path):
    def with_stops(stops):
        body = request_body(path, "x", 4)
        if path == "/v1/code-completion":
            body["parameters"]["stop"] = stops
        else:
            body["stop"] = stops
        return post_json(url, path, body)

    assert with_stops([f"{i:03d}" + "q" * 253 for i in range(32)]).status_code == 200  # 32 of 256 characters
    too_long = with_stops(["q" * 257])
    assert too_long.status_code == 400 and "longer than 256" in message_of(path, too_long)


# --- 4. lone surrogates ---

SURROGATE_BODIES = [  # (path, raw JSON with the escape \ud800 in a text the prompt is built from)
    ("/v1/completions", rb'{"prompt": "a\ud800b", "max_tokens": 4}'),
    ("/v1/completions", rb'{"prompt": "a", "suffix": "\ud800", "max_tokens": 4}'),
    ("/v1/completions", rb'{"prompt": ["ok", "\ud800"], "max_tokens": 4}'),
    ("/v1/completions", rb'{"prompt": "\ud800", "max_tokens": 4, "echo": true, "stream": true}'),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 4}'),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}'),
    ("/completion", rb'{"prompt": "\ud800", "n_predict": 4}'),
    ("/completions", rb'{"prompt": "x\ud800", "n_predict": 4, "stream": true}'),
    ("/infill", rb'{"input_prefix": "\ud800", "n_predict": 4}'),
    ("/infill", rb'{"input_prefix": "a", "input_suffix": "\ud800", "n_predict": 4}'),
    ("/infill", rb'{"input_prefix": "a", "prompt": "\ud800", "n_predict": 4}'),
    ("/infill", rb'{"input_prefix": "a", "input_extra": [{"text": "\ud800", "filename": "b.py"}], "n_predict": 4}'),
    ("/v1/code-completion", rb'{"inputs": {"sources": {"a.py": "x\ud800\n"}, "cursor": {"file": "a.py", "line": 1,'
                            rb' "character": 0}, "multiline": true}, "parameters": {"max_new_tokens": 4}}'),
]


@pytest.mark.parametrize(("path", "raw"), SURROGATE_BODIES)
def test_lone_surrogate_is_a_400(url, expected, path, raw):
    response = httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    message = message_of(path, response)
    assert "not valid Unicode" in message and "Traceback" not in message
    assert_still_serves(url, expected)


def test_surrogate_pairs_are_fine(url):
    raw = rb'{"prompt": "s = \"\ud83d\ude00\"", "max_tokens": 3, "echo": true}'
    response = httpx.post(url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and response.json()["choices"][0]["text"].startswith('s = "\U0001f600"')


# --- 5. a multi-megabyte prompt is built off the event loop ---

BIG = "value = compute(1, 2, 3)\n" * 300_000  # 7.5 MB; 7.8 MB of JSON, under the 8 MiB body limit


@contextmanager
def held_in_worker(monkeypatch, module, name: str):
    """Make module.name (a prompt builder run in the thread pool) wait until released; yield
    (entered, release) events."""
    real = getattr(module, name)
    entered, release = threading.Event(), threading.Event()

    def held(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, held)
    try:
        yield entered, release
    finally:
        release.set()
        monkeypatch.setattr(module, name, real)


@pytest.mark.parametrize(("path", "module", "builder", "body", "status"), [
    ("/completion", llamacpp, "completion_prompt", {"prompt": BIG, "n_predict": 4, "temperature": 0}, 200),
    ("/v1/completions", openai, "completion_prompts", {"prompt": BIG, "max_tokens": 4, "temperature": 0}, 400),
    ("/v1/completions", openai, "completion_prompts", {"prompt": BIG, "suffix": "\n", "max_tokens": 4, "temperature": 0}, 200),
])
def test_health_answers_while_a_huge_prompt_is_being_built(url, expected, monkeypatch, path, module, builder, body, status):
    with held_in_worker(monkeypatch, module, builder) as (entered, release), ThreadPoolExecutor(1) as pool:
        big = pool.submit(post_json, url, path, body)
        while not entered.wait(0.05):
            assert not big.done(), big.result().text
        # the prompt is being built right now; were that on the event loop, /health would wait for it
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert not big.done()
        release.set()
        response = big.result()
    assert response.status_code == status, response.text[:300]
    if status == 400:
        assert "over 252 tokens" in openai_message(response)
    elif path == "/completion":  # the answer is that for the prompt's end: all that fits in the context
        reply = response.json()
        assert reply["truncated"] is True and reply["tokens_evaluated"] == 256 - 4
        assert reply["content"] == post_json(url, path, {**body, "prompt": BIG[-50_000:]}).json()["content"]
    else:
        tail = post_json(url, path, {**body, "prompt": BIG[-50_000:]})
        assert response.json()["choices"][0]["text"] == tail.json()["choices"][0]["text"]
    assert_still_serves(url, expected)


# --- 6. the Host header (DNS rebinding) ---


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8008", "localhost.evil.example", "127.0.0.1.evil.example",
                                  "EVIL.example."])
def test_foreign_host_is_403(url, expected, host):
    for method, path, body in [("GET", "/v1/status", None), ("POST", "/v1/completions", GREEDY),
                               ("POST", "/infill", {"input_prefix": "x", "n_predict": 2}),
                               ("POST", "/v1/code-completion", code_completion_body("x\n")), ("GET", "/health", None)]:
        response = httpx.request(method, url + path, json=body, headers={"Host": host})
        assert response.status_code == 403, (path, response.text)
        assert "--allowed-host" in message_of(path, response)
    assert_still_serves(url, expected)


def test_loopback_names_are_accepted(url):
    port = url.rsplit(":", 1)[1]
    for host in ["localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}", "LocalHost.",
                 "app.localhost"]:
        response = httpx.get(url + "/v1/status", headers={"Host": host})
        assert response.status_code == 200 and response.json()["model"] == "tiny", host


def test_allowed_host_is_accepted(model, small_tokenizer):
    with running_server(model, small_tokenizer, allowed_hosts=("code.example",)) as (base, _):
        port = base.rsplit(":", 1)[1]
        assert httpx.get(base + "/v1/status", headers={"Host": f"code.example:{port}"}).status_code == 200
        reply = httpx.post(base + "/v1/completions", json=GREEDY, headers={"Host": "Code.Example"})
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"]
        assert httpx.get(base + "/v1/status", headers={"Host": "evil.example"}).status_code == 403


# --- 7. a body sent without Content-Type: application/json ---


@pytest.mark.parametrize("path", GENERATION_ROUTES)
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=b"])
def test_json_without_json_content_type_is_refused(url, path, content_type):
    """What a cross-site form post or no-cors fetch sends; none of these is preflighted."""
    raw = json.dumps(request_body(path, "x", 2)).encode()
    response = httpx.post(url + path, content=raw, headers={} if content_type is None else {"Content-Type": content_type})
    assert response.status_code == 400 and "Content-Type: application/json" in message_of(path, response)
    assert httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"}).status_code == 200


# --- 8. the API key guards everything but /health and the web page ---


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/openapi.json/"])
def test_api_docs_need_the_key(keyed_url, path):
    for method in ("GET", "HEAD"):
        refused = httpx.request(method, keyed_url + path)
        assert refused.status_code == 401
    assert "API key" in openai_message(httpx.get(keyed_url + path))
    if not path.endswith("/"):
        assert httpx.get(keyed_url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_openapi_schema_with_the_key(keyed_url):
    schema = httpx.get(keyed_url + "/openapi.json", headers={"x-api-key": KEY}).json()
    assert "/v1/completions" in schema["paths"]


@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_bad_json_without_a_key_is_401_not_400(keyed_url, path):
    for raw in (b"{not json", b'{"prompt": "\xff"}', b"[1, 2]"):
        refused = httpx.post(keyed_url + path, content=raw, headers={"Content-Type": "application/json"})
        assert refused.status_code == 401 and "API key" in message_of(path, refused)
    wrong = httpx.post(keyed_url + path, content=b"{not json",
                       headers={"Content-Type": "application/json", "Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    keyed = httpx.post(keyed_url + path, content=b"{not json",
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    assert keyed.status_code == 400 and "not valid JSON" in message_of(path, keyed)


def test_public_paths_stay_public(keyed_url):
    assert httpx.get(keyed_url + "/health").json() == {"status": "ok"}
    assert httpx.get(keyed_url + "/").status_code == 200
    assert httpx.get(keyed_url + "/v1/models").status_code == 401


def test_ui_prefix_does_not_reach_protected_routes(keyed_url):
    port = int(keyed_url.rsplit(":", 1)[1])
    for target in ("/ui/../openapi.json", "/ui/%2e%2e/openapi.json", "/ui/..%2fv1/models"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.split(b" ")[1] in (b"401", b"404") and b'"paths"' not in reply, target


# --- 9. an engine failure mid-stream is an error, in each protocol's schema ---


@pytest.fixture
def failing_decode(monkeypatch):
    """After `ok` decode steps (the first token comes from the prefill), every decode step raises."""
    import midfill.engine.scheduler as scheduler

    real = scheduler.decode_rows
    state = {"calls": 0, "ok": 2}

    def decode_rows(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] > state["ok"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler, "decode_rows", decode_rows)
    return state


FAILING_BODIES = {  # each answers "length" after 8 tokens when nothing fails
    "/v1/completions": {"prompt": "import os\n", "max_tokens": 8, "temperature": 0},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0},
    "/completion": {"prompt": "import os\n", "n_predict": 8, "temperature": 0},
    "/infill": {"input_prefix": "import os\n", "n_predict": 8, "temperature": 0},
    "/v1/code-completion": code_completion_body("import os\n", 8, temperature=0),
}


def successful_finish(path: str, event: dict) -> bool:
    if path in ("/completion", "/infill"):
        return event.get("stop") is True or "stop_type" in event
    return any(c.get("finish_reason") is not None for c in event.get("choices", []))


@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_engine_failure_mid_stream_is_an_error_event(url, expected, failing_decode, monkeypatch, path):
    body = FAILING_BODIES[path]
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200  # the stream had started
        events = sse(response)
    errors = [e for e in events if isinstance(e, dict) and ("error" in e or "detail" in e)]
    assert len(errors) == 1 and failing_decode["calls"] > failing_decode["ok"]
    error = errors[0]
    if path.startswith("/v1/code-completion"):
        assert set(error) == {"detail"} and "failed" in error["detail"]
    elif path.startswith("/v1/"):
        assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["type"] == "server_error"
    else:
        assert set(error["error"]) == {"code", "message", "type"} and error["error"]["code"] == 500
        assert events[-1] is error  # llama.cpp ends a failed stream with its error
    assert not any(successful_finish(path, e) for e in events if isinstance(e, dict))

    failing_decode["calls"] = 0
    plain = post_json(url, path, body)
    assert plain.status_code == 500, plain.text
    assert message_of(path, plain)

    monkeypatch.undo()  # the engine works again: the same request now runs to its length
    reply = post_json(url, path, body).json()
    reason = reply.get("stop_type") or reply["choices"][0]["finish_reason"]
    assert reason in ("length", "limit")
    assert_still_serves(url, expected)


def test_health_is_503_once_the_engine_thread_is_gone(model, small_tokenizer):
    with running_server(model, small_tokenizer) as (base, engine):
        assert httpx.get(base + "/health").status_code == 200
        engine.stop()
        health = httpx.get(base + "/health")
        assert health.status_code == 503 and "not running" in llama_message(health)
        refused = httpx.post(base + "/v1/completions", json=GREEDY)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1" and openai_message(refused)


# --- 10. slow heads, oversized fan-out, HEAD ---


def read_response(s: socket.socket) -> bytes:
    """One HTTP response with a Content-Length from a keep-alive socket (b"" if the server closed it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += s.recv(65536)
    return head + b"\r\n\r\n" + rest


def trickle_until_closed(s: socket.socket, data: bytes) -> int:
    """Send `data` a byte every 10 ms until the server closes the connection; return how many were sent."""
    for sent in range(len(data)):
        try:
            s.sendall(data[sent : sent + 1])
        except ConnectionError:
            return sent
        if select.select([s], [], [], 0.01)[0]:
            try:
                assert s.recv(65536) == b""  # closed, without an answer
            except ConnectionError:
                pass
            return sent
    return len(data)


HEAD_DEADLINE_S = 1.0  # instead of 10 s, to keep the tests short; long enough for a loaded machine to read a head


def test_a_client_trickling_its_head_is_disconnected(url, expected, monkeypatch):
    monkeypatch.setattr(H11WithHeadDeadline, "head_timeout_s", HEAD_DEADLINE_S)
    port = int(url.rsplit(":", 1)[1])
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 2000 + b"\r\n\r\n"  # 20 s at this pace
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert trickle_until_closed(s, head) < len(head)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # after a first answer, the same
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        assert trickle_until_closed(s, head) < len(head)
    assert_still_serves(url, expected)


def test_a_slow_body_after_a_prompt_head_is_still_answered(url, monkeypatch):
    """The deadline is for the head only: an upload may take longer."""
    monkeypatch.setattr(H11WithHeadDeadline, "head_timeout_s", HEAD_DEADLINE_S)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"input_prefix": "x", "n_predict": 2}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        time.sleep(2.5 * HEAD_DEADLINE_S)
        s.sendall(body)
        assert read_response(s).startswith(b"HTTP/1.1 200")


def test_prompts_times_n_over_16_is_a_400(server, expected):
    url, engine = server
    fan_out = post_json(url, "/v1/completions", {"prompt": ["a", "b", "c", "d", "e"], "max_tokens": 2, "n": 4})
    assert fan_out.status_code == 400 and "at most 16" in openai_message(fan_out)
    ids = post_json(url, "/v1/completions", {"prompt": [[1, 2]] * 17, "max_tokens": 2})
    assert ids.status_code == 400 and "at most 16" in openai_message(ids)
    for path in ("/v1/completions", "/v1/chat/completions"):
        too_many = post_json(url, path, request_body(path, "x", 2, n=17))
        assert too_many.status_code == 400 and "n" in openai_message(too_many)
    assert engine.queue_depth == 0
    sixteen = post_json(url, "/v1/completions", {"prompt": ["a", "b", "c", "d"], "max_tokens": 2, "n": 4})
    assert sixteen.status_code == 200 and sorted(c["index"] for c in sixteen.json()["choices"]) == list(range(16))
    assert_still_serves(url, expected)


@pytest.mark.parametrize("path", ["/health", "/v1/health", "/v1/models", "/refact-caps"])
def test_head_is_answered_like_get_without_a_body(url, path):
    get, head = httpx.get(url + path), httpx.head(url + path)
    assert get.status_code == 200 == head.status_code
    assert head.content == b"" and int(head.headers["content-length"]) == len(get.content)


def test_head_needs_the_key_where_get_does(keyed_url):
    assert httpx.head(keyed_url + "/health").status_code == 200
    assert httpx.head(keyed_url + "/v1/models").status_code == 401
    assert httpx.head(keyed_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# --- ignored fields are named in a header: hostile names must not break the response ---


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/completion", "/infill"])
def test_hostile_unknown_field_names_still_get_an_answer(url, expected, path):
    for names in (["a\r\nSet-Cookie: x=1"], ["\x00"], ["\u65e5\u672c", "\xe9"], [f"f{i}" for i in range(5_000)]):
        response = post_json(url, path, {**request_body(path, "x", 2), **dict.fromkeys(names, 1)})
        assert response.status_code == 200, response.text
        assert "set-cookie" not in response.headers
        value = response.headers["x-midfill-ignored-fields"]
        assert value.isascii() and value.isprintable() and len(value) <= 1024
        assert value.startswith(min(names).encode("unicode_escape").decode())  # sorted, escaped
    assert_still_serves(url, expected)


# --- SIGTERM stops a real `midfill serve` after a hostile request ---


@pytest.mark.skipif(not (EMBEDDED_MODEL / "model.safetensors").is_file(), reason="no embedded model in this checkout")
def test_sigterm_stops_serve_after_a_hostile_seed(tmp_path):
    with serve_subprocess(tmp_path) as (base, proc, log_file):
        plain = {"prompt": "def mean(xs):\n", "max_tokens": 6, "temperature": 0}
        before = httpx.post(base + "/v1/completions", json=plain, timeout=60).json()["choices"][0]["text"]
        hostile = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "n": 2, "seed": 2**64 - 1},
                             timeout=60)
        assert hostile.status_code == 200 and len(hostile.json()["choices"]) == 2
        after = httpx.post(base + "/v1/completions", json=plain, timeout=60).json()["choices"][0]["text"]
        assert after == before and httpx.get(base + "/health").json() == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    log = log_file.read_text()
    assert "stopped; 0 unfinished requests cancelled" in log and "Traceback" not in log
