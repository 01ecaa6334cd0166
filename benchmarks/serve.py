"""Serving benchmark: keystroke time to first token (cold vs warm prefix cache) and throughput.

    python benchmarks/serve.py [--model DIR] [--dtype auto] [--keystrokes 40]

Without --model it builds a random-weight Refact-architecture model (n_embd 512, 8 layers) and a
BPE tokenizer trained on the standard library, so it runs offline anywhere; speed does not depend
on what the weights are. A 1,500-token Python file is "typed" one character at a time at a cursor
near its end; each keystroke is an /infill request with n_predict 1, so its latency is the time to
first token. Cold: cache_prompt false (full prefill every time). Warm: the prefix cache on.
With --model the checkpoint loads as `midfill serve` loads it (--dtype auto: the default path).
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from midfill.model import GPTRefactForCausalLM, RefactConfig
from midfill.model.checkpoint import load_model
from midfill.server.background import running_server
from midfill.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

TARGET_TOKENS = 1500


def stdlib_sources() -> list[str]:
    folder = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*.py"))]


def synthetic_model(tok: Tokenizer) -> GPTRefactForCausalLM:
    torch.manual_seed(0)
    config = RefactConfig(vocab_size=4096, n_embd=512, n_layer=8, n_head=8, n_positions=2048)
    return GPTRefactForCausalLM(config).eval()


def file_of_tokens(tok: Tokenizer, sources: list[str], n_tokens: int) -> str:
    """About n_tokens of real Python source, cut at a line end."""
    text = next(s for s in sources if len(tok.encode(s)) > n_tokens * 1.2)
    lines, out = text.splitlines(keepends=True), ""
    for line in lines:
        if len(tok.encode(out + line)) > n_tokens:
            break
        out += line
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def keystrokes(url: str, text: str, cache: bool, typed: int) -> list[float]:
    """Latency of each keystroke's request (ms) while the last `typed` characters are typed."""
    cursor = len(text) - 200  # leave a suffix after the cursor
    start = cursor - typed
    times = []
    with httpx.Client(timeout=120) as client:
        for end in range(start, cursor + 1):
            body = {"input_prefix": text[:end], "input_suffix": text[cursor:], "n_predict": 1, "temperature": 0,
                    "cache_prompt": cache}
            began = time.perf_counter()
            client.post(url + "/infill", json=body).raise_for_status()
            times.append((time.perf_counter() - began) * 1000)
    return times[1:]  # the first request of a run only fills the cache


def throughput(url: str, texts: list[str], clients: int, n_requests: int) -> float:
    def one(i: int) -> None:
        text = texts[i % len(texts)]
        cut = len(text) // 2
        body = {"input_prefix": text[:cut][-2000:], "input_suffix": text[cut:][:500], "n_predict": 32,
                "temperature": 0, "cache_prompt": False}
        httpx.post(url + "/infill", json=body, timeout=300).raise_for_status()

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(n_requests)))
    return n_requests / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: a synthetic model)")
    parser.add_argument("--dtype", default="auto", help="as `midfill serve --dtype` (synthetic model: float32 for auto)")
    parser.add_argument("--keystrokes", type=int, default=40, help="characters typed per run (fewer for a large model)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (0: keystrokes only)")
    args = parser.parse_args()

    sources = stdlib_sources()
    if args.model:
        model, tok = load_model(args.model, dtype=args.dtype), load_tokenizer(args.model)
    else:
        tok = train_tokenizer(sources[:200], vocab_size=4096)
        model = synthetic_model(tok).to(getattr(torch, "float32" if args.dtype == "auto" else args.dtype))
    text = file_of_tokens(tok, sources, TARGET_TOKENS)
    print(f"model: {model.num_parameters():,} parameters, {model.weight_format or model.dtype}; file: {len(tok.encode(text))} tokens; "
          f"torch threads: {torch.get_num_threads()}")

    with running_server(model, tok, max_batch=16, max_queue=256, prefix_cache_mb=512) as (url, _):
        cold = keystrokes(url, text, cache=False, typed=args.keystrokes)
        warm = keystrokes(url, text, cache=True, typed=args.keystrokes)
        print("\n| keystroke time to first token | median ms | p95 ms |\n|---|---|---|")
        print(f"| cold (no prefix cache) | {statistics.median(cold):.1f} | {percentile(cold, 0.95):.1f} |")
        print(f"| warm (prefix cache) | {statistics.median(warm):.1f} | {percentile(warm, 0.95):.1f} |")
        print(f"| warm / cold (median) | {statistics.median(warm) / statistics.median(cold):.3f} | |")

        if not args.requests:
            return
        texts = [s for s in sources if len(s) > 3000][:64]
        print("\n| concurrent clients | requests/s (32 new tokens each) |\n|---|---|")
        for clients in (1, 4, 16):
            print(f"| {clients} | {throughput(url, texts, clients, args.requests):.2f} |")


if __name__ == "__main__":
    main()
