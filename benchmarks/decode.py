"""Decode benchmark: Refact-1.6B's real shape on this machine, fp32 / bf16 / int8 / int4 weights.

    python benchmarks/decode.py [--formats fp32,bf16,int8,int4] [--prompt 512] [--new 64] [--layers N]
                                [--rows 1,2,4,8] [--variants avx2,avx512vnni]

Builds a random-weight model with the real 1.6B config in memory (no download; speed does not
depend on the values), then per format, each in its own process so peak RSS is its own:
- read bandwidth: a 1 GiB buffer on huge pages (as the packed weights are) read by midfill's native
  read loop and by torch's sum (the better of the two), measured between slices of the decode, so
  the bound and the speed share one run;
- time to first token and prefill tokens/s on a --prompt-token prompt (chunked prefill);
- decode tokens/s over --new tokens, through the engine's own decode loop (midfill.engine);
- the bound: bandwidth / bytes of weights read per token, and decode speed as a fraction of it
  (the median over the slices);
- with --rows: aggregate decode tokens/s of batches of that many rows (one decode step for all
  rows, midfill.model.decode_step, as the engine batches requests or a speculative step verifies
  drafted tokens) and each count's ratio to one row, the counts taking turns within each round;
  every row attends to --prompt cached positions (random keys and values: speed ignores them).
Each format runs with the kernel variant the CPU gets by default (native.variant(), printed), or
with each of --variants in turn (MIDFILL_KERNELS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from midfill.engine.request import GenerationRequest
from midfill.engine.scheduler import Engine
from midfill.kernels import native
from midfill.kernels.huge_pages import huge_page_bytes
from midfill.model import GPTRefactForCausalLM, KVCache, RefactConfig
from midfill.model.alibi import alibi_slopes
from midfill.model.decode_step import decode_one
from midfill.model.quantize import PackedLinear, empty_packed, linear_layers, place_on_huge_pages, weight_bytes_per_token

BANDWIDTH_BYTES = 1 << 30


def random_packed(layer: PackedLinear) -> None:
    """Fill a packed layer with random codes and plausible scales (speed ignores the values)."""
    for name, buffer in layer.named_buffers():
        if buffer.dtype in (torch.int8, torch.uint8):
            value = torch.randint(-127 if buffer.dtype == torch.int8 else 0, 128, buffer.shape, dtype=buffer.dtype)
        else:
            value = (torch.randn(buffer.shape) * 0.02).to(buffer.dtype)
        setattr(layer, name, value)


def build(fmt: str, n_layer: int | None) -> GPTRefactForCausalLM:
    config = RefactConfig() if n_layer is None else RefactConfig(n_layer=n_layer)
    with torch.device("meta"):
        model = GPTRefactForCausalLM(config)
    if fmt != "fp32":
        empty_packed(model, fmt)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if "ln" in name else torch.randn_like(param) * 0.02)
        for _, _, _, layer in linear_layers(model):
            if isinstance(layer, PackedLinear):
                random_packed(layer)
    place_on_huge_pages(model)
    model.alibi_slopes = alibi_slopes(config.n_head)
    return model.eval()


class Bandwidth:
    """Read bandwidth of a buffer far larger than the caches, through every reader on offer."""

    def __init__(self) -> None:
        self.buffer = huge_page_bytes(BANDWIDTH_BYTES).view(torch.float32).fill_(1.0)  # on 2 MiB pages, like the weights
        self.readers = [lambda: float(self.buffer.sum())]
        if native.available():
            self.readers.append(lambda: native.read_bandwidth(self.buffer))

    def measure(self, passes: int = 1) -> float:
        """Best bytes/s over `passes` reads with each reader."""
        best = 0.0
        for read in self.readers:
            for _ in range(passes):
                start = time.perf_counter()
                read()
                best = max(best, BANDWIDTH_BYTES / (time.perf_counter() - start))
        return best


def measure_rows(model: GPTRefactForCausalLM, counts: list[int], context: int, steps: int = 4, rounds: int = 4) -> dict:
    """Aggregate decode tokens/s per row count (median of `rounds`) and its ratio to one row (median per round).

    The counts take turns within each round, so a drift in bandwidth moves them together.
    """
    config = model.config
    caches = {}
    for count in counts:
        cache = KVCache.allocate(config, count, context + rounds * steps + 1, torch.float32, "cpu")
        cache.k.normal_()
        cache.v.normal_()
        cache.lengths.fill_(context)
        caches[count] = cache
    speeds = {count: [] for count in counts}
    for _ in range(rounds):
        for count in counts:
            ids = torch.randint(0, config.vocab_size, (count,))
            start = time.perf_counter()
            for _ in range(steps):
                decode_one(model, ids, caches[count])
            speeds[count].append(count * steps / (time.perf_counter() - start))
    base = 1 if 1 in counts else counts[0]
    return {
        "rows_tok_s": {count: statistics.median(s) for count, s in speeds.items()},
        "rows_ratio": {count: statistics.median(a / b for a, b in zip(s, speeds[base])) for count, s in speeds.items()},
    }


def measure(
    fmt: str, prompt_tokens: int, new_tokens: int, n_layer: int | None, rounds: int = 8, row_counts: list[int] | None = None
) -> dict:
    """Prefill, then decode in `rounds` slices, each right after a bandwidth reading; then the row counts, if any.

    This machine's bandwidth drifts by 20% from minute to minute, so the fraction of the bound
    is taken per round (tokens/s over the bound of that moment) and the median round reported.
    """
    model = build(fmt, n_layer)
    weight_bytes = weight_bytes_per_token(model)
    bandwidth = Bandwidth()
    bandwidth.measure(passes=2)  # warm both readers
    prompt = torch.randint(0, model.config.vocab_size, (prompt_tokens,)).tolist()
    # the serving engine, stepped from here; a token a pass (no prompt-lookup drafts: on random weights
    # they would be accepted or rejected by chance, and this measures the kernels against the bound)
    engine = Engine(model, None, max_batch=1, prefix_cache_mb=0, speculate=False)
    engine.submit(GenerationRequest(prompt, new_tokens + 1, stop_ids=frozenset(), cache_prompt=False), lambda event: None)

    start = time.perf_counter()
    engine.step()  # the admitting turn: prefill and the first token
    ttft = time.perf_counter() - start
    per_round = max(1, new_tokens // rounds)
    fractions, readings, decode_seconds, decoded = [], [], 0.0, 0
    while decoded < new_tokens:
        readings.append(bandwidth.measure())
        n = min(per_round, new_tokens - decoded)
        start = time.perf_counter()
        for _ in range(n):
            engine.step()
        elapsed = time.perf_counter() - start
        decode_seconds, decoded = decode_seconds + elapsed, decoded + n
        fractions.append((n / elapsed) / (readings[-1] / weight_bytes))
    decode = new_tokens / decode_seconds
    band = statistics.median(readings)
    batched = measure_rows(model, row_counts, prompt_tokens) if row_counts else {}
    return {
        "format": fmt,
        "layers": model.config.n_layer,
        "parameters": model.num_parameters(),
        "weight_bytes_per_token": weight_bytes,
        "bandwidth_gb_s": band / 1e9,
        "ttft_s": ttft,
        "prefill_tok_s": prompt_tokens / ttft,
        "decode_tok_s": decode,
        "bound_tok_s": band / weight_bytes,
        "fraction_of_bound": statistics.median(fractions),
        "fraction_per_round": [round(f, 3) for f in fractions],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "native_kernels": native.available(),
        "kernels": native.variant(),
        "threads": torch.get_num_threads(),
        **batched,
    }


def report(row: dict) -> str:
    line = (
        f"{row['format']:>5} [{row['kernels'] or 'torch'}]: {row['weight_bytes_per_token'] / 1e9:.2f} GB/token, "
        f"read {row['bandwidth_gb_s']:.1f} GB/s, bound {row['bound_tok_s']:.2f} tok/s, decode {row['decode_tok_s']:.2f} tok/s "
        f"({row['fraction_of_bound']:.0%} of bound), prefill {row['prefill_tok_s']:.1f} tok/s, "
        f"TTFT {row['ttft_s']:.2f} s, peak RSS {row['peak_rss_gb']:.2f} GB"
    )
    if "rows_tok_s" in row:  # steps/s over the bound: how near each row count still is to reading the weights only
        speeds = row["rows_tok_s"]
        line += "\n       rows: " + ", ".join(
            f"{count}: {speed:.2f} tok/s ({row['rows_ratio'][count]:.2f}x, steps at {speed / int(count) / row['bound_tok_s']:.0%} of bound)"
            for count, speed in speeds.items()
        )
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="fp32,bf16,int8,int4")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick look (default: the real 32)")
    parser.add_argument("--rows", default="", help="row counts to decode together, e.g. 1,2,4,8 (default: none)")
    parser.add_argument("--variants", default="", help="kernel variants to run each format with, e.g. avx2,avx512vnni")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one format in this process (used by the parent)
    args = parser.parse_args()
    row_counts = [int(count) for count in args.rows.split(",") if count]
    if args.one:
        print(json.dumps(measure(args.one, args.prompt, args.new, args.layers, row_counts=row_counts)))
        return
    rows = []
    for variant in args.variants.split(",") if args.variants else [None]:
        environment = {**os.environ, native.OVERRIDE: variant} if variant else None
        for fmt in args.formats.split(","):
            command = [sys.executable, __file__, "--one", fmt, "--prompt", str(args.prompt), "--new", str(args.new)]
            command += ["--layers", str(args.layers)] if args.layers else []
            command += ["--rows", args.rows] if row_counts else []
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
            rows.append(json.loads(done.stdout.splitlines()[-1]))
            print(report(rows[-1]), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
