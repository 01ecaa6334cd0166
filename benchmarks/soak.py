"""Soak: many concurrent clients against a real `midfill serve`, hostile requests mixed in.

    python benchmarks/soak.py [--clients 64] [--seconds 180]

Starts `midfill serve` (the embedded model, 127.0.0.1 only, with an API key) as a subprocess and
takes the greedy answer of every checked request once, alone. Then each client loops until the
deadline: greedy requests on all three protocols (OpenAI, Refact, llama.cpp; streamed and not),
whose text must equal the answer taken before; malformed and hostile requests (bad JSON, unknown
fields, huge seeds, temperature 1e-39, 100 and 10,000 stop strings, a lone surrogate, a foreign
Host header, n=16 over 4 prompts, a 1 MB prompt, a wrong or missing key); and clients that
disconnect mid-stream or before the answer. Prints a table; the exit code is 1 if anything
answered 5xx, any checked answer differed, a request got no answer, or the server died or did not
stop within 15 s of SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import httpx

HOST = "127.0.0.1"
MAX_TOKENS = 12  # small: the 2-core machine's CPU belongs to the server
THINK_S = (0.02, 0.1)
REQUEST_TIMEOUT_S = 60.0
SIGTERM_GRACE_S = 15.0
RSS_EVERY_S = 30.0

PROMPTS = [  # (prefix, suffix): the cursor sits between them
    ("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"),
    ("import os\n\n\ndef list_files(folder):\n    ", "\n    return files\n"),
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        ", "\n"),
    ("def fib(n):\n    if n < 2:\n        return n\n    ", "\n"),
    ("for i in range(10):\n    ", "\nprint('done')\n"),
    ("def read_json(path):\n    with open(path) as f:\n        ", "\n"),
]


@dataclass(frozen=True)
class Probe:
    """One request to send, and how to judge its answer."""

    kind: str  # "good", or the hostile/disconnect case's name
    protocol: str  # openai, refact or llama.cpp
    path: str
    body: dict | bytes
    stream: bool = False
    headers: dict = field(default_factory=dict)
    expect: str | None = None  # name of the baseline this answer must equal
    name: str = ""  # the baseline name a good probe defines

    def content(self) -> bytes:
        # json.dumps escapes lone surrogates ("\ud800"), which a UTF-8 encoder would refuse
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


def good_probes() -> list[Probe]:
    """Every greedy request whose answer is checked: 6 routes x the prompts x streamed or not."""
    probes = []
    for i, (prefix, suffix) in enumerate(PROMPTS):
        line = prefix.count("\n")
        character = len(prefix) - (prefix.rfind("\n") + 1)
        bodies = {
            ("openai", "/v1/completions", "plain"): {"prompt": prefix, "max_tokens": MAX_TOKENS, "temperature": 0},
            ("openai", "/v1/completions", "fim"): {"prompt": prefix, "suffix": suffix, "max_tokens": MAX_TOKENS,
                                                   "temperature": 0},
            ("openai", "/v1/chat/completions", "chat"): {
                "messages": [{"role": "user", "content": f"Complete this code:\n{prefix}"}],
                "max_tokens": MAX_TOKENS, "temperature": 0},
            ("refact", "/v1/code-completion", "fim"): {
                "inputs": {"sources": {"a.py": prefix + suffix}, "cursor": {"file": "a.py", "line": line,
                                                                             "character": character},
                           "multiline": i % 2 == 0},
                "parameters": {"temperature": 0, "max_new_tokens": MAX_TOKENS}},
            ("llama.cpp", "/infill", "fim"): {"input_prefix": prefix, "input_suffix": suffix, "n_predict": MAX_TOKENS,
                                              "temperature": 0},
            ("llama.cpp", "/completion", "plain"): {"prompt": prefix, "n_predict": MAX_TOKENS, "temperature": 0},
        }
        for (protocol, path, variant), body in bodies.items():
            for stream in (False, True):
                name = f"{path}:{variant}:{i}:{'stream' if stream else 'whole'}"
                probes.append(Probe("good", protocol, path, {**body, "stream": stream}, stream, expect=name, name=name))
    return probes


def with_fields(probe: Probe, kind: str, **fields) -> Probe:
    """The probe with body fields replaced (Refact's sampling fields live under "parameters")."""
    body = dict(probe.body)
    for key, value in fields.items():
        if probe.protocol == "refact" and key in ("temperature", "stop"):
            body["parameters"] = {**body["parameters"], key: value}
        elif key == "prompt":
            set_prompt(body, probe, value)
        else:
            body[key] = value
    return replace(probe, kind=kind, body=body, expect=None, name="")


def set_prompt(body: dict, probe: Probe, text: str) -> None:
    if probe.path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": text}]
    elif probe.path == "/v1/code-completion":
        body["inputs"] = {"sources": {"a.py": text}, "cursor": {"file": "a.py", "line": 0, "character": 0},
                          "multiline": False}
    elif probe.path == "/infill":
        body["input_prefix"] = text
    else:
        body["prompt"] = text


def hostile_probe(rng: random.Random, good: list[Probe], key: str) -> Probe:
    """A malformed or hostile request, drawn by weight; tiny temperatures are checked against greedy."""
    base = rng.choice(good)
    kinds = ["bad json", "unknown field", "huge seed", "temperature 1e-39", "100 stop strings",
             "10,000 stop strings", "lone surrogate", "Host: evil.example", "n=16 x 4 prompts", "1 MB prompt",
             "wrong API key", "no API key"]
    weights = [3, 3, 3, 4, 2, 1, 3, 2, 2, 0.3, 2, 1]
    kind = rng.choices(kinds, weights)[0]
    if kind == "bad json":
        return replace(base, kind=kind, body=rng.choice([b'{"prompt": "x",', b"not json", b"\xff\xfe{}", b"[1, 2"]),
                       expect=None, name="")
    if kind == "unknown field":
        return with_fields(base, kind, frobnicate=1)
    if kind == "huge seed":  # Refact's protocol has no seed
        base = rng.choice([p for p in good if p.protocol != "refact"])
        seed, n = rng.choice([(2**64, 2), (-(2**63) - 1, 1), (2**64 - 1, 2), (2**64, 1)])
        extra = {"n": n} if base.protocol == "openai" else {}
        return with_fields(base, kind, seed=seed, temperature=0.8, **extra)
    if kind == "temperature 1e-39":
        return replace(with_fields(base, kind, temperature=1e-39), expect=base.name)
    if kind in ("100 stop strings", "10,000 stop strings"):
        count = 100 if kind.startswith("100") else 10_000
        return with_fields(base, kind, stop=[f"<stop{i}>" for i in range(count)])
    if kind == "lone surrogate":
        return with_fields(base, kind, prompt="def f():\n    return '\ud800'\n")
    if kind == "Host: evil.example":
        if rng.random() < 0.3:
            return Probe(kind, "openai", "/v1/status", b"", headers={"Host": "evil.example"})
        return replace(with_fields(base, kind), headers={"Host": "evil.example"})
    if kind == "n=16 x 4 prompts":
        return Probe(kind, "openai", "/v1/completions",
                     {"prompt": [p for p, _ in PROMPTS[:4]], "n": 16, "max_tokens": MAX_TOKENS, "temperature": 0.8})
    if kind == "1 MB prompt":
        return with_fields(base, kind, prompt="x = 1\n" * (2**20 // 6))
    if kind == "wrong API key":
        return replace(with_fields(base, kind), headers={"Authorization": f"Bearer {key}x"})
    return replace(with_fields(base, kind), headers={"Authorization": ""})


def disconnect_probe(rng: random.Random, good: list[Probe]) -> Probe:
    """A long request whose client leaves: mid-stream, or before a whole answer comes."""
    base = rng.choice(good)
    long = {"n_predict": 200} if base.protocol == "llama.cpp" else {"max_tokens": 200}
    if base.protocol == "refact":
        long = {"parameters": {**base.body["parameters"], "max_new_tokens": 200}}
    stream = rng.random() < 0.7
    probe = with_fields(base, "disconnect mid-stream" if stream else "disconnect before the answer", **long)
    return replace(probe, body={**probe.body, "stream": stream}, stream=stream)


@dataclass
class Answer:
    """What came back: status, the text (joined over a stream), and an error event a stream carried."""

    status: int
    text: str = ""
    stream_error: str | None = None


def piece(probe: Probe, data: dict) -> str:
    """The completion text in one response body or stream event."""
    if probe.protocol == "llama.cpp":
        return data.get("content", "")
    choice = (data.get("choices") or [{}])[0]
    if probe.path == "/v1/chat/completions":
        return choice.get("delta", {}).get("content", "") if probe.stream else choice["message"]["content"]
    return choice.get("code_completion" if probe.protocol == "refact" else "text", "")


async def send(client: httpx.AsyncClient, probe: Probe, key: str, stop_after_events: int | None = None) -> Answer:
    """Send a probe; with stop_after_events, close the connection after that many stream events."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **probe.headers}
    headers = {k: v for k, v in headers.items() if v}
    method = "GET" if probe.path == "/v1/status" else "POST"
    request = client.build_request(method, probe.path, content=probe.content() if method == "POST" else None,
                                   headers=headers)
    response = await client.send(request, stream=True)
    try:
        if response.status_code != 200 or not probe.stream:
            body = await response.aread()
            if response.status_code != 200 or method == "GET":
                return Answer(response.status_code)
            return Answer(200, piece(probe, json.loads(body)))
        text, events, error = [], 0, None
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data or "detail" in data:
                error = line
            text.append(piece(probe, data))
            events += 1
            if stop_after_events is not None and events >= stop_after_events:
                break
        return Answer(200, "".join(text), error)
    finally:
        await response.aclose()


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)  # status class -> count
    by_kind: dict = field(default_factory=lambda: defaultdict(Counter))  # kind -> status -> count
    latency: dict = field(default_factory=lambda: defaultdict(list))  # protocol -> seconds (good requests)
    checked: int = 0
    wrong: list = field(default_factory=list)  # (probe, expected text, text)
    rss_mb: list = field(default_factory=list)  # the server's RSS every RSS_EVERY_S
    failures: list = field(default_factory=list)  # (probe, what went wrong)



async def client_loop(seed: int, url: str, key: str, deadline: float, good: list[Probe], baseline: dict,
                      tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        while time.monotonic() < deadline:
            roll = rng.random()
            probe = rng.choice(good) if roll < 0.6 else hostile_probe(rng, good, key) if roll < 0.9 else \
                disconnect_probe(rng, good)
            began = time.perf_counter()
            try:
                if probe.kind == "disconnect mid-stream":
                    answer = await send(client, probe, key, stop_after_events=rng.randint(1, 3))
                elif probe.kind == "disconnect before the answer":
                    answer = await asyncio.wait_for(send(client, probe, key), timeout=rng.uniform(0.05, 0.5))
                else:
                    answer = await send(client, probe, key)
            except (asyncio.TimeoutError, TimeoutError):
                tally.by_kind[probe.kind]["left"] += 1
                continue
            except httpx.HTTPError as exc:
                tally.failures.append((probe, f"no answer: {exc!r}"))
                tally.by_kind[probe.kind]["no answer"] += 1
                continue
            except (json.JSONDecodeError, KeyError, TypeError) as exc:  # a 200 whose body is not the protocol's
                tally.failures.append((probe, f"unreadable answer: {exc!r}"))
                tally.by_kind[probe.kind]["unreadable"] += 1
                continue
            elapsed = time.perf_counter() - began
            tally.statuses[f"{answer.status // 100}xx"] += 1
            tally.by_kind[probe.kind][answer.status] += 1
            if answer.status >= 500:
                tally.failures.append((probe, f"status {answer.status}"))
            if answer.stream_error:
                tally.failures.append((probe, f"error inside the stream: {answer.stream_error}"))
            if probe.kind == "good" and answer.status == 200:
                tally.latency[probe.protocol].append(elapsed)
            if probe.expect is not None and answer.status != 200:
                if answer.status < 500:  # 5xx were noted above
                    tally.failures.append((probe, f"a checked request was refused: {answer.status}"))
            elif probe.expect is not None:
                tally.checked += 1
                if answer.text != baseline[probe.expect]:
                    tally.wrong.append((probe, baseline[probe.expect], answer.text))
            await asyncio.sleep(rng.uniform(*THINK_S))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """The process's resident set (VmRSS) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def start_server(port: int, key: str, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "midfill.cli", "serve", "--host", HOST, "--port", str(port), "--api-key", key]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} before answering; see {log.name}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.kill()
    raise SystemExit("the server did not answer /health within 180 s")


def server_5xx(url: str, key: str) -> int:
    """5xx answers the server itself counted (including ones to clients that had left)."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    return sum(int(float(m.group(1))) for m in re.finditer(r'^midfill_requests_total\{[^}]*status="5\d\d"[^}]*\} (\S+)',
                                                           text, re.M))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def short(value, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


async def watch_rss(pid: int, deadline: float, tally: Tally) -> None:
    while time.monotonic() < deadline:
        await asyncio.sleep(min(RSS_EVERY_S, max(deadline - time.monotonic(), 0)))
        try:
            tally.rss_mb.append(rss_mb(pid))
        except OSError:  # the server is gone; the end checks say so
            return


async def soak(url: str, key: str, pid: int, clients: int, seconds: float, good: list[Probe], baseline: dict) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds
    loops = [client_loop(i, url, key, deadline, good, baseline, tally) for i in range(clients)]
    await asyncio.gather(watch_rss(pid, deadline, tally), *loops)
    return tally


async def take_baseline(url: str, key: str, good: list[Probe]) -> dict[str, str]:
    """Each checked request's greedy answer, sent one at a time before the soak."""
    baseline = {}
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        for probe in good:
            answer = await send(client, probe, key)
            if answer.status != 200 or answer.stream_error:
                raise SystemExit(f"baseline request failed: {probe.path} {short(probe.body)} -> {answer.status} "
                                 f"{answer.stream_error or ''}")
            baseline[probe.name] = answer.text
    return baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--log", help="where the server's output goes (default: a temporary file)")
    args = parser.parse_args()

    key, port = "soak-" + secrets.token_hex(8), free_port()
    url = f"http://{HOST}:{port}"
    log = open(args.log, "w") if args.log else tempfile.NamedTemporaryFile("w", prefix="soak-server-", suffix=".log",
                                                                          delete=False)
    began = time.monotonic()
    server = start_server(port, key, log)
    print(f"server pid {server.pid} at {url}, up in {time.monotonic() - began:.1f} s; log {log.name}")

    good = good_probes()
    baseline = asyncio.run(take_baseline(url, key, good))
    split = sum(baseline[p.name] != baseline[p.name.replace(":stream", ":whole")] for p in good if p.stream)
    print(f"baseline: {len(baseline)} greedy answers; streamed != whole for {split} of {len(good) // 2} pairs")
    rss_before = rss_mb(server.pid)

    began = time.monotonic()
    tally = asyncio.run(soak(url, key, server.pid, args.clients, args.seconds, good, baseline))
    soak_s = time.monotonic() - began
    alive = server.poll() is None
    rss_after = rss_mb(server.pid) if alive else float("nan")

    health = plain = False
    counted_5xx = -1  # unknown until /metrics answers
    if alive:
        try:
            health = httpx.get(f"{url}/health", timeout=10).json().get("status") == "ok"
            probe = good[0]
            answer = asyncio.run(take_baseline(url, key, [probe]))
            plain = answer[probe.name] == baseline[probe.name]
            counted_5xx = server_5xx(url, key)
        except (httpx.HTTPError, SystemExit, ValueError) as exc:
            print(f"end checks failed: {exc}")

    server.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    try:
        code = server.wait(timeout=SIGTERM_GRACE_S)
        # uvicorn shuts down gracefully, then raises the captured SIGTERM again: the status is -15
        stopped = f"yes, in {time.monotonic() - stopped_at:.1f} s (status {code})"
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        code, stopped = None, "no (killed)"
    log.close()
    tracebacks = open(log.name).read().count("Traceback")

    answered = sum(tally.statuses.values())
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(tally.statuses.items()))
    rows = [
        ("clients, seconds", f"{args.clients}, {soak_s:.0f} s (deadline {args.seconds:.0f} s)"),
        ("requests answered", f"{answered} ({answered / soak_s:.1f}/s)"),
        ("correct (of checked)", f"{tally.checked - len(tally.wrong)} of {tally.checked}"),
    ]
    for protocol in ("openai", "refact", "llama.cpp"):
        times = tally.latency[protocol]
        rows.append((f"good {protocol}: p50 / p95", f"{percentile(times, .5) * 1000:.0f} / "
                                                    f"{percentile(times, .95) * 1000:.0f} ms (n={len(times)})"))
    rows += [
        ("status classes", statuses),
        ("5xx (client seen / server counted)", f"{tally.statuses['5xx']} / {counted_5xx}"),
        ("no answer or unreadable answer", str(sum(c["no answer"] + c["unreadable"] for c in tally.by_kind.values()))),
        ("tracebacks in the server log", str(tracebacks)),
        ("server RSS before / after", f"{rss_before:.0f} / {rss_after:.0f} MiB"),
        (f"server RSS every {RSS_EVERY_S:.0f} s", " ".join(f"{m:.0f}" for m in tally.rss_mb) + " MiB"),
        ("alive; /health; plain request correct", f"{'yes' if alive else 'NO'}; {'ok' if health else 'FAILED'}; "
                                                   f"{'yes' if plain else 'NO'}"),
        ("exited within 15 s of SIGTERM", stopped),
    ]
    print("\n| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\n| request kind | answers by status |\n|---|---|")
    for kind, counts in sorted(tally.by_kind.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"| {kind} | {', '.join(f'{s}: {n}' for s, n in sorted(counts.items(), key=str))} |")

    for probe, expected, got in tally.wrong[:10]:
        print(f"WRONG {probe.kind} {probe.path} {short(probe.body)}: expected {expected!r}, got {got!r}")
    for probe, what in tally.failures[:10]:
        print(f"FAILED {probe.kind} {probe.path} headers={probe.headers} {short(probe.body)}: {what}")
    bad = (tally.statuses["5xx"] or counted_5xx or tally.wrong or tally.failures or not (alive and health and plain)
           or code is None)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
