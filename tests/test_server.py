"""The server over real HTTP on loopback: every protocol, batching, prefix cache, cancellation."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from midfill.engine import StopRules, TextAssembler, cursor_indent, stream_text
from midfill.prompts import ChatMessage, chat_prompt, fim_prompt_spm
from midfill.server.background import running_server
from tests.helpers import tiny_model

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


@pytest.fixture(scope="module")
def server(model, small_tokenizer):
    # token healing off: the outputs are compared with plain, unhealed prompts
    with running_server(model, small_tokenizer, max_batch=8, token_healing=False) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def reference(model, tok, prompt_ids, max_tokens, rules=StopRules(), stop_ids=None):
    """What one greedy generation gives through the plain (non-server) path."""
    assembler = TextAssembler(tok, rules)
    stop_ids = stop_ids or {tok.eot_id}
    return "".join(stream_text(model, prompt_ids, assembler, max_tokens, stop_ids=stop_ids))


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


# --- OpenAI protocol, with the official client ---


def test_completion_equals_greedy_reference(client, model, small_tokenizer):
    result = client.completions.create(model="tiny", prompt="import os\n", max_tokens=12, temperature=0)
    expected = reference(model, small_tokenizer, small_tokenizer.encode("import os\n"), 12)
    assert result.choices[0].text == expected
    assert result.usage.completion_tokens == 12 and result.choices[0].finish_reason == "length"


def test_fim_through_suffix(client, model, small_tokenizer):
    result = client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=10, temperature=0)
    expected = reference(model, small_tokenizer, fim_prompt_spm(small_tokenizer, PREFIX, SUFFIX), 10)
    assert result.choices[0].text == expected


def test_streamed_completion_joins_to_the_same_text(client):
    kwargs = dict(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=16, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_echo_and_n_with_seed(client):
    result = client.completions.create(model="tiny", prompt="x = ", max_tokens=5, temperature=1.0, n=3, seed=7, echo=True)
    assert sorted(c.index for c in result.choices) == [0, 1, 2]
    assert all(c.text.startswith("x = ") for c in result.choices)
    again = client.completions.create(model="tiny", prompt="x = ", max_tokens=5, temperature=1.0, n=3, seed=7, echo=True)
    assert [c.text for c in again.choices] == [c.text for c in result.choices]


def test_chat_equals_greedy_reference(client, model, small_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort a list"}]
    result = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    ids = chat_prompt(small_tokenizer, [ChatMessage(m["role"], m["content"]) for m in messages])
    stops = {small_tokenizer.eot_id, small_tokenizer.empty_output_id}
    expected = reference(model, small_tokenizer, ids, 12, StopRules(trim_trailing_whitespace=True), stops)
    assert result.choices[0].message.content == expected.strip()
    assert result.choices[0].message.role == "assistant"


def test_streamed_chat(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason is not None


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_openai_client_sees_its_own_error_type(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)
    assert "context" in info.value.message


# --- llama.cpp protocol ---


def test_infill_equals_greedy_reference(server, model, small_tokenizer):
    url, _ = server
    body = {"input_prefix": "def add(a, b):\n", "prompt": "    ", "input_suffix": SUFFIX, "n_predict": 10, "temperature": 0}
    reply = httpx.post(url + "/infill", json=body).json()
    ids = fim_prompt_spm(small_tokenizer, "def add(a, b):\n    ", SUFFIX)
    assert reply["content"] == reference(model, small_tokenizer, ids, 10)
    assert reply["stop"] is True and reply["stop_type"] in ("eos", "limit")
    assert reply["tokens_evaluated"] == len(ids) and reply["timings"]["predicted_n"] == reply["tokens_predicted"]


def test_infill_response_fields_are_flattened(server):
    body = {"input_prefix": "x = ", "n_predict": 3, "response_fields": ["content", "timings/prompt_n", "tokens_cached"]}
    reply = httpx.post(server[0] + "/infill", json=body).json()
    assert set(reply) == {"content", "timings/prompt_n", "tokens_cached"}


def test_infill_stream_ends_with_a_final_object(server):
    body = {"input_prefix": "import ", "n_predict": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", server[0] + "/infill", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    whole = httpx.post(server[0] + "/infill", json={**body, "stream": False}).json()["content"]
    assert "".join(e["content"] for e in events) == whole


def test_infill_n_indent_cuts_at_a_dedent(server, model, small_tokenizer):
    body = {"input_prefix": "class A:\n    def f(self):\n        ", "n_predict": 60, "temperature": 0, "n_indent": 8}
    content = httpx.post(server[0] + "/infill", json=body).json()["content"]
    for line in content.split("\n")[1:]:
        assert not line.strip() or len(line) - len(line.lstrip()) >= 8


def test_infill_with_extra_context_and_warm_up(server, small_tokenizer):
    url, _ = server
    extra = [{"filename": "util.py", "text": "def helper():\n    return 42\n", "time": 1.0}]
    warm = httpx.post(url + "/infill", json={"input_prefix": "", "input_extra": extra, "n_predict": 0}).json()
    assert warm["tokens_predicted"] == 0 and warm["content"] == ""
    reply = httpx.post(url + "/infill", json={"input_prefix": "x = helper", "input_extra": extra, "n_predict": 4}).json()
    assert reply["tokens_evaluated"] > len(small_tokenizer.encode("def helper():\n    return 42\n"))


def test_completion_and_health(server):
    url, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    reply = httpx.post(url + "/completion", json={"prompt": "for i in", "n_predict": 5, "temperature": 0}).json()
    assert reply["tokens_predicted"] <= 5 and reply["truncated"] is False


def test_over_long_completion_prompt_keeps_its_end(server):
    reply = httpx.post(server[0] + "/completion", json={"prompt": "word " * 400, "n_predict": 4}).json()
    assert reply["truncated"] is True and reply["tokens_evaluated"] <= 256 - 4


# --- Refact protocol ---


def test_refact_caps_and_tokenizer(server, small_tokenizer):
    url, _ = server
    caps = httpx.get(url + "/refact-caps").json()
    assert caps["code_completion_default_model"] == "tiny" and caps["running_models"] == ["tiny"]
    model_caps = caps["code_completion_models"]["tiny"]
    assert model_caps["default_scratchpad"] == "FIM-SPM" and model_caps["n_ctx"] == 256
    assert model_caps["supports_scratchpads"]["FIM-SPM"]["fim_middle"] == "<fim_middle>"
    tokenizer = httpx.get(url + caps["tokenizer_path_template"].replace("$MODEL", "tiny")).json()
    assert tokenizer["model"]["type"] == "BPE"
    assert httpx.get(url + "/tokenizer/other").status_code == 404


def test_code_completion_builds_the_prompt_at_the_cursor(server, model, small_tokenizer):
    source = "def add(a, b):\n    \n\nprint(add(1, 2))\n"
    body = {"inputs": {"sources": {"a.py": source}, "cursor": {"file": "a.py", "line": 1, "character": 4}, "multiline": True},
            "parameters": {"temperature": 0, "max_new_tokens": 20}}
    reply = httpx.post(server[0] + "/v1/code-completion", json=body).json()
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    rules = StopRules.for_mode("multi-line", cursor_indent(prefix))
    expected = reference(model, small_tokenizer, fim_prompt_spm(small_tokenizer, prefix, suffix), 20, rules)
    assert reply["choices"][0]["code_completion"] == expected
    assert reply["model"] == "tiny" and "created" in reply


def test_code_completion_single_line(server):
    source = "values = [\n"
    body = {"inputs": {"sources": {"a.py": source}, "cursor": {"file": "a.py", "line": 1, "character": 0}, "multiline": False},
            "parameters": {"temperature": 0, "max_new_tokens": 40}}
    reply = httpx.post(server[0] + "/v1/code-completion", json=body).json()
    assert "\n" not in reply["choices"][0]["code_completion"]


def test_code_completion_bad_cursor(server):
    body = {"inputs": {"sources": {"a.py": "x\n"}, "cursor": {"file": "a.py", "line": 5, "character": 0}, "multiline": False}}
    response = httpx.post(server[0] + "/v1/code-completion", json=body)
    assert response.status_code == 400 and "cursor.line 5" in response.json()["detail"]
    body["inputs"]["cursor"]["file"] = "b.py"
    assert "not one of the sources" in httpx.post(server[0] + "/v1/code-completion", json=body).json()["detail"]


# --- the engine under load ---


def test_sixteen_concurrent_greedy_requests_equal_one_at_a_time(server):
    url, _ = server
    bodies = [{"input_prefix": f"def f{i}(x):\n    return x{'+1' * i}", "n_predict": 16, "temperature": 0, "cache_prompt": False}
              for i in range(16)]
    alone = [httpx.post(url + "/infill", json=b).json()["content"] for b in bodies]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda b: httpx.post(url + "/infill", json=b, timeout=60).json()["content"], bodies))
    assert together == alone


def test_keystroke_reuses_the_cached_prefix(server, small_tokenizer):
    url, _ = server
    prefix = "import os\nimport sys\n\ndef main(argv):\n    path = os.path.join(argv[0], 'data')\n    return pa"
    first = httpx.post(url + "/infill", json={"input_prefix": prefix, "input_suffix": SUFFIX, "n_predict": 4}).json()
    second = httpx.post(url + "/infill", json={"input_prefix": prefix + "t", "input_suffix": SUFFIX, "n_predict": 4}).json()
    ids1 = fim_prompt_spm(small_tokenizer, prefix, SUFFIX)
    ids2 = fim_prompt_spm(small_tokenizer, prefix + "t", SUFFIX)
    shared = next(i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b)
    assert first["tokens_evaluated"] == len(ids1)
    assert second["tokens_cached"] >= shared > len(ids1) - 5


def slow(model, seconds: float):
    """The same model, slowed down per forward pass or decode step, so that a test can act mid-generation.

    The head runs once in both (the lean decode step calls it directly), so that is where to wait.
    """
    forward = model.lm_head.forward

    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.lm_head.forward = slowed
    return model


@pytest.fixture(scope="module")
def slow_server(small_tokenizer):
    with running_server(slow(tiny_model(seed=4), 0.02), small_tokenizer, max_batch=2, max_queue=2) as (url, engine):
        yield url, engine


def test_streaming_disconnect_stops_generation(slow_server):
    url, _ = slow_server
    before = metric(url, "midfill_cancelled_requests_total")
    tokens_before = metric(url, "midfill_completion_tokens_total")
    body = {"prompt": "x", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 10
    while metric(url, "midfill_cancelled_requests_total") <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "midfill_cancelled_requests_total") == before + 1
    assert metric(url, "midfill_completion_tokens_total") - tokens_before < 100


def test_non_streaming_disconnect_stops_generation(slow_server):
    url, _ = slow_server
    before = metric(url, "midfill_cancelled_requests_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/infill", json={"input_prefix": "x", "n_predict": 200, "temperature": 0}, timeout=0.5)
    deadline = time.monotonic() + 10
    while metric(url, "midfill_cancelled_requests_total") <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "midfill_cancelled_requests_total") == before + 1


def test_requests_on_one_slot_run_one_after_another(slow_server):
    url, engine = slow_server  # as llama.cpp does: the newer request waits; neither is cut short
    results = {}

    def post(name, body):
        results[name] = httpx.post(url + "/infill", json=body, timeout=60).json()

    older = threading.Thread(target=post, args=("older", {"input_prefix": "a", "n_predict": 40, "temperature": 0, "id_slot": 3}))
    older.start()
    deadline = time.monotonic() + 30
    while not engine.active and time.monotonic() < deadline:  # the older request is running
        time.sleep(0.01)
    newer = threading.Thread(target=post, args=("newer", {"input_prefix": "b", "n_predict": 3, "temperature": 0, "id_slot": 3}))
    newer.start()
    while engine.queue_depth == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.queue_depth == 1 and len(engine.active) == 1  # a free row, yet the newer one waits for its slot
    older.join()
    newer.join()
    assert results["older"]["tokens_predicted"] == 40 and results["older"]["stop_type"] == "limit"
    assert results["newer"]["tokens_predicted"] == 3


def test_deadline_t_max_predict_ms(slow_server):
    body = {"input_prefix": "x", "n_predict": 200, "temperature": 1.0, "seed": 1}
    free = httpx.post(slow_server[0] + "/infill", json=body, timeout=30).json()
    limited = httpx.post(slow_server[0] + "/infill", json={**body, "t_max_predict_ms": 100}, timeout=30).json()
    assert free["tokens_predicted"] > limited["tokens_predicted"] and free["content"].startswith(limited["content"])
    assert limited["stop_type"] == "limit" and "\n" in limited["content"]  # stops only once a line is complete
    assert limited["timings"]["predicted_ms"] >= 100


def test_full_queue_answers_503_at_once(slow_server):
    url, _ = slow_server
    body = {"input_prefix": "q", "n_predict": 30, "cache_prompt": False}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: httpx.post(url + "/infill", json=body, timeout=30), range(8)))
    busy = [r for r in replies if r.status_code == 503]
    assert busy and all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == 503 for r in busy)
    assert any(r.status_code == 200 for r in replies)
