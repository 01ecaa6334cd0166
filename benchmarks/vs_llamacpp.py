"""midfill against llama.cpp on this machine: Refact-1.6B's real shape, random weights, three formats.

    python benchmarks/vs_llamacpp.py [--formats bf16,int8,int4] [--rounds 2] [--threads 2] [--prompt 512]
                                     [--new 64] [--layers N] [--cache DIR] [--out FILE.json]

benchmarks/decode.py says how close midfill comes to this machine's read bound; this says how it
stands against the engine people would otherwise run, on the same weights. Made once and cached
(--cache, default midfill's cache folder):
- llama.cpp, built from the tree that the llama-cpp-python sdist vendors (a registry package, so a
  pinned source) with -DGGML_NATIVE=ON. On a CPU with AMX also a copy with the compiler barrier of
  llama.cpp PR #26954 (issue #20824: gcc 12 drops the writes that fill the AMX tile config, and every
  q8_0/q4_0 batch of more than one token segfaults in ggml_backend_amx_mul_mat);
- a random-weight checkpoint with the real config (speed does not depend on the values), saved in
  bf16 like the real one, and its GGUFs: bf16 from the tree's own converter, q8_0 and q4_0 from
  llama-quantize.
Then per pair (midfill bf16 ~ bf16, int8 ~ q8_0, int4 ~ q4_0) llama-bench and midfill take turns,
--rounds times, every measurement in its own process so its peak RSS is its own: decode tokens/s
at depth 0 and after a --prompt-token context (--new tokens each), prefill tokens/s of --prompt
tokens. llama.cpp runs with its defaults (flash attention "auto", the log says what it became);
once per format also with --repack 0 (weights used in place from the mmap: the memory figure, or
on an AMX CPU the stock build's only safe setting). midfill loads through load_model's default
path: the bf16 checkpoint itself, and for int8/int4 a copy packed once by `midfill quantize` (as
the GGUFs are quantized once). The read bandwidth (benchmarks/decode.py's probe) and the load
average are taken before every run: each decode is given as a fraction of its bound (bandwidth /
bytes of weights a token reads), and other work on the cores, which slows either engine many
times over, shows in the report. For bf16, midfill's process also times the prompt's matrix products
done alone by torch's bf16 kernels (oneDNN; AMX where the CPU has it), right after its own prefill:
the yardstick that prefill on packed weights is held to. midfill's peak RSS is its process's high-water
mark (VmHWM) after loading, decoding and the prompt, read before that yardstick allocates weights of
its own (the whole process's peak, yardstick included, is kept in the JSON as process_peak_rss_gb).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import site
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from decode import Bandwidth  # the sibling benchmark's probe (this folder is on sys.path when run as a script)
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from midfill.engine.request import GenerationRequest
from midfill.engine.scheduler import Engine
from midfill.hub import EMBEDDED_MODEL
from midfill.kernels import native
from midfill.model import GPTRefactForCausalLM, RefactConfig, quantize
from midfill.model.checkpoint import load_model, save_model
from midfill.model.quantize import weight_bytes_per_token

VERSION = "0.3.36"  # llama-cpp-python; its CHANGELOG names the llama.cpp commit it vendors
GGUF_TYPES = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}  # midfill format -> the llama.cpp format it is set against
BINARIES = ("llama-bench", "llama-quantize")
# Only the two tools are built, so nothing needs curl, OpenSSL or the tests.
CMAKE_FLAGS = (
    "-DGGML_NATIVE=ON",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
NO_REPACK = "--repack 0"  # the llama.cpp configuration run once per format, for its memory figure
BARRIER = 'asm volatile("" ::: "memory");  // added by midfill benchmarks/vs_llamacpp.py: llama.cpp #20824, PR #26954'
CONSOLE = Console(log_path=False)
MEASURES = [  # (key, table label, number format) of each measurement, in the table's order
    ("decode_d0_tok_s", "decode d0 tok/s", ".2f"),
    ("decode_deep_tok_s", "decode d{n} tok/s", ".2f"),
    ("prefill_tok_s", "prefill {n} tok/s", ".1f"),
    ("peak_rss_gb", "peak RSS GB", ".2f"),
    ("fraction_of_bound", "decode d0 / read bound", ".0%"),
    ("products_alone_tok_s", "{n} tokens of bf16 products alone (oneDNN) tok/s", ".1f"),
    ("prefill_of_products_alone", "prefill / products alone", ".0%"),
]

# Run with the converter's interpreter: the tree's convert_hf_to_gguf.py, imported as a module after
# one change. midfill's tokenizer is not Refact's own, so the converter does not know its
# pre-tokenizer hash; the checkpoint is a Refact one, and its pre-tokenizer (single digits, then
# byte-level BPE) is the one llama.cpp calls "refact", which the real model's hash maps to.
CONVERT = """
import runpy, sys
tree = sys.argv.pop(1)
sys.path[:0] = [tree, tree + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "refact"
sys.argv[0] = tree + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# Bytes one decoded token reads from a GGUF (every tensor, one row of the embedding) and its tensor types.
GGUF_STATS = """
import collections, json, sys
sys.path.insert(0, sys.argv[1] + "/gguf-py")
from gguf import GGUFReader
tensors = GGUFReader(sys.argv[2]).tensors
embedding = next(t for t in tensors if t.name == "token_embd.weight")
per_token = sum(int(t.n_bytes) for t in tensors if t is not embedding) + int(embedding.n_bytes) // int(embedding.shape[-1])
print(json.dumps({"weight_bytes_per_token": per_token, "tensor_types": collections.Counter(t.tensor_type.name for t in tensors)}))
"""


# Runs a command, then writes its exit status and peak RSS to a file. A child's ru_maxrss starts at
# the RSS of the process it was forked from (Linux keeps the old memory's high-water mark at exec),
# so the command is forked from this small interpreter, not from the benchmark and its 1 GiB probe.
LAUNCH = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"exit": os.waitstatus_to_exitcode(status), "peak_rss_kib": usage.ru_maxrss}, f)
"""


@dataclass
class Finished:
    returncode: int  # negative: killed by that signal
    peak_rss_gb: float
    log: Path


def failure(done: Finished) -> dict:
    """A failed measurement as the report keeps it (a crash is a result, not the end of the run)."""
    how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
    return {"error": how, "log": str(done.log)}


def run(command: list[object], label: str, log: Path, stdout: Path | None = None, check: bool = True) -> Finished:
    """Run a command with its output in `log` and a live status line meanwhile; its exit status and own peak RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    record = log.with_name(log.name + ".exit")
    record.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "wb") as err, CONSOLE.status(label) as status:
        out = open(stdout, "wb") if stdout else err
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(record), *map(str, command)], stdout=out, stderr=err)
        if stdout:
            out.close()
        while proc.poll() is None:
            status.update(f"{label} [dim]{time.perf_counter() - start:.0f} s  {escape(last_line(log))}[/]")
            time.sleep(0.5)
    outcome = json.loads(record.read_text()) if record.is_file() else {"exit": proc.returncode or 1, "peak_rss_kib": 0}
    rc = outcome["exit"]
    CONSOLE.log(f"{label}: {time.perf_counter() - start:.0f} s" + (f", exit {rc}" if rc else ""))
    if check and rc:
        CONSOLE.print(escape(log.read_text(errors="replace")[-3000:]))
        raise SystemExit(f"{label} failed (exit {rc}); the whole log: {log}")
    return Finished(rc, outcome["peak_rss_kib"] * 1024 / 1e9, log)


def last_line(log: Path) -> str:
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 400))
        lines = f.read().decode(errors="replace").replace("\r", "\n").split("\n")
    return next((line.strip()[:70] for line in reversed(lines) if line.strip()), "")


def cpu() -> dict:
    """The CPU's name and which of the instruction sets both engines care about it has."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s*(.+)", lscpu)
    flags = set(Path("/proc/cpuinfo").read_text().split())
    return {"model": name.group(1).strip() if name else "unknown", "cores": os.cpu_count(), **{f: f in flags for f in CPU_FLAGS}}


# --- llama.cpp: the source, the builds, the converter's environment ---------------------------------


def fetch_tree(root: Path) -> tuple[Path, str]:
    """The vendored llama.cpp tree of the llama-cpp-python sdist, downloaded and unpacked once; and its commit."""
    sdist_dir = root / f"llama_cpp_python-{VERSION}"
    if not sdist_dir.is_dir():
        archive = root / f"llama_cpp_python-{VERSION}.tar.gz"
        if not archive.is_file():
            pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", f"llama-cpp-python=={VERSION}"]
            run([*pip, "-d", root], f"downloading llama-cpp-python {VERSION} (sdist)", root / "download.log")
        with CONSOLE.status(f"unpacking {archive.name}"), tarfile.open(archive) as tar:
            tar.extractall(root / "unpacking", filter="data")
        (root / "unpacking" / sdist_dir.name).rename(sdist_dir)
        shutil.rmtree(root / "unpacking")
    changelog = (sdist_dir / "CHANGELOG.md").read_text()
    section = changelog.split(f"## [{VERSION}]", 1)[-1]
    commit = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return sdist_dir / "vendor" / "llama.cpp", commit.group(1) if commit else "unknown"


def patched_tree(tree: Path, root: Path) -> Path:
    """A copy of the tree with a compiler barrier before every AMX tile-config load (the fix of PR #26954)."""
    copy = root / "llama.cpp-amx-barrier"
    if copy.is_dir():
        return copy
    shutil.copytree(tree, root / "copying", symlinks=True)
    count = 0
    for source in sorted((root / "copying" / "ggml" / "src" / "ggml-cpu" / "amx").iterdir()):
        text, n = re.subn(
            r"^([ \t]*)(_tile_loadconfig\()", lambda m: f"{m[1]}{BARRIER}\n{m[1]}{m[2]}", source.read_text(), flags=re.M
        )
        source.write_text(text)
        count += n
    if not count:
        raise SystemExit(f"no _tile_loadconfig call found under {tree}/ggml/src/ggml-cpu/amx: the patch needs updating")
    (root / "copying").rename(copy)
    CONSOLE.log(f"patched {count} _tile_loadconfig call(s) in {copy}")
    return copy


def build(tree: Path, build_dir: Path, label: str) -> Path:
    """llama-bench and llama-quantize of `tree`, built once; the folder that holds them."""
    bins = build_dir / "bin"
    if all((bins / name).is_file() for name in BINARIES):
        return bins
    run(["cmake", "-S", tree, "-B", build_dir, *CMAKE_FLAGS], f"configuring llama.cpp ({label})", build_dir.with_suffix(".log"))
    command = ["cmake", "--build", build_dir, "-j", "2", "--target", *BINARIES]
    run(command, f"building llama.cpp ({label}, 2 jobs)", build_dir.with_suffix(".build.log"))
    return bins


def converter_python(root: Path, tree: Path) -> Path:
    """An interpreter for the tree's converter: its own venv, which sees this environment's torch and numpy."""
    venv = root / "converter-venv"
    python = venv / "bin" / "python"
    if (venv / "ready").is_file():
        return python
    run([sys.executable, "-m", "venv", "--system-site-packages", venv], "creating the converter's venv", root / "venv.log")
    # --system-site-packages gives the base interpreter's packages, not this venv's: a .pth adds
    # ours (torch, numpy) after the venv's own, so only what the converter lacks is installed there.
    site_packages = next((venv / "lib").glob("python*/site-packages"))
    (site_packages / "midfill-parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pins = (tree / "requirements" / "requirements-convert_legacy_llama.txt").read_text()
    transformers = re.search(r"^transformers\S*", pins, flags=re.M)  # the version the tree's converter is tested with
    packages = [transformers.group(0) if transformers else "transformers", "tqdm", "pyyaml", "requests"]
    run([python, "-m", "pip", "install", *packages], f"installing {', '.join(packages)} for the converter", root / "pip.log")
    (venv / "ready").touch()
    return python


# --- the checkpoint and its GGUFs -----------------------------------------------------------------


def make_checkpoint(folder: Path, n_layer: int | None) -> Path:
    """A random-weight Refact checkpoint in bf16 (weights N(0, 0.02), norms 1) with a tokenizer, saved once."""
    if (folder / "config.json").is_file():
        return folder
    config = RefactConfig() if n_layer is None else RefactConfig(n_layer=n_layer)
    with CONSOLE.status(f"making a random {config.n_layer}-layer checkpoint in {folder}"):
        with torch.device("meta"):
            model = GPTRefactForCausalLM(config)
        model = model.to(torch.bfloat16).to_empty(device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "ln" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02)
        folder.mkdir(parents=True, exist_ok=True)
        # midfill's own tokenizer (8,192 ids); the converter pads the config's 49,216 with [PAD] tokens
        shutil.copy(EMBEDDED_MODEL / "tokenizer.json", folder / "tokenizer.json")
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        save_model(model, folder)  # config.json last: its presence marks a whole checkpoint
    CONSOLE.log(f"made a random {config.n_layer}-layer bf16 checkpoint: {folder}")
    return folder


def make_gguf(kind: str, folder: Path, tree: Path, bins: Path, python: Path) -> Path:
    """The checkpoint as a GGUF of `kind`: bf16 from the tree's converter, the others quantized from that."""
    target = folder / f"{kind}.gguf"
    if target.is_file():
        return target
    partial = target.with_suffix(".partial")
    if kind == "bf16":
        command = [python, "-c", CONVERT, tree, folder, "--outtype", "bf16", "--outfile", partial]
        run(command, "converting the checkpoint to a bf16 GGUF (the tree's convert_hf_to_gguf.py)", folder / "convert.log")
    else:
        source = make_gguf("bf16", folder, tree, bins, python)
        command = [bins / "llama-quantize", source, partial, kind.upper(), "2"]
        run(command, f"llama-quantize {source.name} -> {kind}", folder / f"quantize-{kind}.log")
    partial.rename(target)
    return target


def packing_version() -> str:
    """A digest of the code that lays packed weights out, so a copy made by other code is made again."""
    sources = [Path(quantize.__file__), next(path for path in native.SOURCES if path.name == "pack.c")]  # not the multiplying kernels
    return hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:12]


def midfill_checkpoint(fmt: str, folder: Path) -> Path:
    """The folder midfill loads for `fmt`: the bf16 checkpoint itself, or a copy packed once by `midfill quantize`.

    As llama-quantize makes the q8_0/q4_0 files once, so midfill's runs load packed weights rather
    than quantize at every load (minutes for int4 on two cores).
    """
    if fmt == "bf16":
        return folder
    packed = folder / f"midfill-{fmt}-{packing_version()}"
    if not (packed / "config.json").is_file():
        command = [sys.executable, "-m", "midfill", "quantize", "--model", folder, "--format", fmt, "--out", packed]
        run(command, f"midfill quantize {folder.name} -> {fmt}", folder / f"midfill-quantize-{fmt}.log")
    return packed


def gguf_stats(gguf: Path, tree: Path, python: Path) -> dict:
    output = subprocess.run([python, "-c", GGUF_STATS, tree, gguf], capture_output=True, text=True, check=True).stdout
    return json.loads(output)


# --- the measurements -----------------------------------------------------------------------------


@dataclass
class Variant:
    """One llama.cpp configuration: which build, whether weights are repacked, and how often it runs."""

    name: str
    bins: Path
    repack: bool
    every_round: bool  # False: once per format (round 1), for its memory figure


def llama_bench(variant: Variant, gguf: Path, args: argparse.Namespace, logs: Path, round_: int) -> dict:
    """Prefill and decode at depth 0, then decode at depth --prompt, from two llama-bench processes."""
    common = [variant.bins / "llama-bench", "-m", gguf, "-t", args.threads, "-r", "1", "-o", "json", "-v"]
    common += [] if variant.repack else ["--repack", "0"]
    tests = [["-p", args.prompt, "-n", args.new, "-d", "0"], ["-p", "0", "-n", args.new, "-d", args.prompt]]
    result: dict = {"peak_rss_gb": 0.0, "buffers_mib": {}}
    slug = re.sub(r"\W+", "", variant.name)
    for i, test in enumerate(tests):
        stem = logs / f"llamacpp-{gguf.stem}-{slug}-r{round_ + 1}-{i + 1}"
        label = f"round {round_ + 1}: llama-bench {gguf.stem} ({variant.name}) {' '.join(map(str, test))}"
        done = run([*common, *test], label, stem.with_suffix(".log"), stdout=stem.with_suffix(".json"), check=False)
        if done.returncode:
            return failure(done)
        log = done.log.read_text(errors="replace")
        flash = re.search(r"Flash Attention (enabled|not supported)", log)
        result["flash_attention"] = "auto -> " + (flash.group(1) if flash else "not reported")
        result["buffers_mib"].update(
            {name: float(mib) for name, mib in re.findall(r"(\S+) model buffer size\s*=\s*([\d.]+) MiB", log)}
        )
        result["peak_rss_gb"] = max(result["peak_rss_gb"], done.peak_rss_gb)
        for row in json.loads(stem.with_suffix(".json").read_text()):
            key = "prefill_tok_s" if row["n_prompt"] else ("decode_deep_tok_s" if row["n_depth"] else "decode_d0_tok_s")
            result[key] = row["avg_ts"]
    return result


def conditions(bandwidth: Bandwidth) -> dict:
    """The machine just before a run: its read bandwidth, and its load (other work on the cores slows either engine)."""
    return {"bandwidth_gb_s": bandwidth.measure() / 1e9, "load_1min": os.getloadavg()[0]}


def timed_request(engine: Engine, prompt: list[int], new: int) -> tuple[float, float]:
    """(seconds of the admitting turn: prefill and first token, decode tokens/s over `new` more) for one request."""
    engine.submit(GenerationRequest(prompt, new + 1, stop_ids=frozenset(), cache_prompt=False), lambda event: None)
    start = time.perf_counter()
    engine.step()
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new):
        engine.step()
    return prefill, new / (time.perf_counter() - start)


def bf16_products_alone(config: RefactConfig, tokens: int, rounds: int = 3) -> float:
    """Seconds that torch's bf16 kernels (oneDNN) alone take for a prompt's matrix products: every
    block's q, kv, c_proj, gate_up and down projections over `tokens` rows, and lm_head on the last.
    The yardstick of issue 19's prefill: no attention, norms or packing, just the products."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(config.n_embd, config.n_embd), (2 * config.head_dim, config.n_embd), (config.n_embd, config.n_embd),
              (2 * config.mlp_hidden, config.n_embd), (config.n_embd, config.mlp_hidden)]  # fmt: skip
    weights = [torch.randn(shape, generator=gen).to(torch.bfloat16) for shape in shapes]
    head = torch.randn(config.vocab_size, config.n_embd, generator=gen).to(torch.bfloat16)
    x = torch.randn(tokens, config.n_embd, generator=gen).to(torch.bfloat16)
    hidden = torch.randn(tokens, config.mlp_hidden, generator=gen).to(torch.bfloat16)
    best = float("inf")
    for _ in range(rounds + 1):  # the first round warms oneDNN's kernels up
        start = time.perf_counter()
        for _ in range(config.n_layer):
            for w in weights:
                torch.nn.functional.linear(hidden if w.shape[1] == config.mlp_hidden else x, w)
        torch.nn.functional.linear(x[-1:], head)
        best = min(best, time.perf_counter() - start)
    return best


def midfill_one(folder: Path, prompt_tokens: int, new: int, threads: int) -> dict:
    """midfill's side, in this (child) process: load the folder (the default path), then decode at depth 0,
    prefill, decode deep."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_model(folder)
    load_s = time.perf_counter() - start
    rss_loaded = int(re.search(r"VmRSS:\s*(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    # no prompt-lookup speculation: llama-bench decodes a token a pass, and a random model's repetitive
    # text would have drafts accepted (or rejected) that say nothing of the decode kernels
    engine = Engine(model, None, max_batch=1, ctx=prompt_tokens + new + 1, prefix_cache_mb=0, speculate=False)
    timed_request(engine, list(range(5, 37)), 4)  # warm up, as llama-bench does
    _, decode_d0 = timed_request(engine, [5], new)
    prompt = torch.randint(5, model.config.vocab_size, (prompt_tokens,)).tolist()
    prefill_s, decode_deep = timed_request(engine, prompt, new)
    peak_rss = int(re.search(r"VmHWM:\s*(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024  # before the yardstick's own weights
    alone = bf16_products_alone(model.config, prompt_tokens) if model.weight_format in (None, "bf16") else None
    return {
        "loaded_as": model.weight_format or str(model.dtype).removeprefix("torch."),
        "weight_bytes_per_token": weight_bytes_per_token(model),
        "load_s": load_s,
        "rss_loaded_gb": rss_loaded / 1e9,
        "peak_rss_gb": peak_rss / 1e9,
        "decode_d0_tok_s": decode_d0,
        "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_deep_tok_s": decode_deep,
        "products_alone_tok_s": alone and prompt_tokens / alone,  # the same process, right after its prefill
        "prefill_of_products_alone": alone and alone / prefill_s,
        "native_kernels": native.available(),
    }


def midfill_run(fmt: str, folder: Path, args: argparse.Namespace, logs: Path, round_: int) -> dict:
    stem = logs / f"midfill-{fmt}-r{round_ + 1}"
    command = [sys.executable, __file__, "--one", folder, "--prompt", args.prompt, "--new", args.new, "--threads", args.threads]
    done = run(
        command, f"round {round_ + 1}: midfill {fmt}", stem.with_suffix(".log"), stdout=stem.with_suffix(".json"), check=False
    )
    if done.returncode:
        return failure(done)
    return {**json.loads(stem.with_suffix(".json").read_text().splitlines()[-1]), "process_peak_rss_gb": done.peak_rss_gb}


# --- the report -----------------------------------------------------------------------------------


def median(runs: list[dict], key: str) -> float | None:
    """The median over the rounds: on a machine whose bandwidth swings 2x between processes (a Zen 4 VM
    read 29-66 GB/s), one slow run moves a mean by a third; with --rounds 3 or more the median is robust."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def add_fractions(runs: list[dict], weight_bytes: float | None) -> None:
    """Each run's decode at depth 0 over the bound of the bandwidth read just before it."""
    for r in runs:
        if weight_bytes and r.get("decode_d0_tok_s"):
            r["fraction_of_bound"] = r["decode_d0_tok_s"] / (r["bandwidth_gb_s"] * 1e9 / weight_bytes)


def summarize(fmt: str, midfill: list[dict], llama: dict[str, list[dict]], stats: dict, main: str) -> dict:
    """One format's medians over the rounds, both engines, and midfill's over llama.cpp's."""
    weight_bytes = median(midfill, "weight_bytes_per_token")
    add_fractions(midfill, weight_bytes)
    for runs in llama.values():
        add_fractions(runs, stats["weight_bytes_per_token"])
    row = {
        "format": fmt,
        "gguf": GGUF_TYPES[fmt],
        "midfill_loaded_as": next((r["loaded_as"] for r in midfill if "loaded_as" in r), None),
        "midfill_rss_loaded_gb": median(midfill, "rss_loaded_gb"),
        "midfill_weight_gb_per_token": weight_bytes and weight_bytes / 1e9,
        "llamacpp_weight_gb_per_token": stats["weight_bytes_per_token"] / 1e9,
        "gguf_tensor_types": stats["tensor_types"],
        "llamacpp_flash_attention": next((r["flash_attention"] for r in llama[main] if "flash_attention" in r), None),
        "llamacpp_buffers_mib": {
            name: next((r["buffers_mib"] for r in runs if "buffers_mib" in r), None) for name, runs in llama.items()
        },
    }
    for key, _, _ in MEASURES:
        ours, theirs = median(midfill, key), median(llama[main], key)
        row[f"midfill_{key}"], row[f"llamacpp_{key}"] = ours, theirs
        row[f"llamacpp_repack0_{key}"] = median(llama[NO_REPACK], key)
        row[f"ratio_{key}"] = ours / theirs if ours is not None and theirs is not None else None
    return row


def cell(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def table(rows: list[dict], args: argparse.Namespace, main: str, readings: list[dict]) -> Table:
    bandwidth, load = [r["bandwidth_gb_s"] for r in readings], [r["load_1min"] for r in readings]
    grid = Table(
        title=f"midfill vs llama.cpp ({main}): Refact-1.6B shape, {args.threads} threads, medians of {args.rounds} rounds",
        caption=f"read bandwidth {statistics.median(bandwidth):.1f} GB/s, median of {len(bandwidth)} readings "
        f"({min(bandwidth):.1f}-{max(bandwidth):.1f}); read bound = bandwidth / weight bytes per token; "
        f"load average before the runs {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores",
    )
    for column in ("format", "measure", "midfill", "llama.cpp", "midfill / llama.cpp", f"llama.cpp {NO_REPACK}"):
        grid.add_column(column, justify="left" if column in ("format", "measure") else "right")
    for row in rows:
        name = f"{row['format']} ~ {row['gguf']}\n[dim]midfill loaded as {row['midfill_loaded_as']}[/]"
        grid.add_row(
            name,
            "weights read / token GB",
            cell(row["midfill_weight_gb_per_token"], ".2f"),
            cell(row["llamacpp_weight_gb_per_token"], ".2f"),
            "",
            "",
        )
        for key, label, form in MEASURES:
            label = label.format(n=args.prompt)
            ratio = "" if key in ("fraction_of_bound", "prefill_of_products_alone") else cell(row[f"ratio_{key}"], ".2f")
            grid.add_row(
                "",
                label,
                cell(row[f"midfill_{key}"], form),
                cell(row[f"llamacpp_{key}"], form),
                ratio,
                cell(row[f"llamacpp_repack0_{key}"], form),
            )
        grid.add_section()
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="bf16,int8,int4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick look (default: the real 32)")
    parser.add_argument("--cache", type=Path, default=native.cache_dir().parent, help="where builds and models are kept")
    parser.add_argument("--out", type=Path, default=None, help="the JSON results (default: in this run's log folder)")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # midfill's side of one measurement, on this folder
    args = parser.parse_args()
    if args.one:
        print(json.dumps(midfill_one(args.one, args.prompt, args.new, args.threads)))
        return
    formats = args.formats.split(",")
    if unknown := set(formats) - set(GGUF_TYPES):
        parser.error(f"unknown format(s) {', '.join(sorted(unknown))}; choose from {', '.join(GGUF_TYPES)}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # midfill's native kernels, here and in the children
    torch.set_num_threads(args.threads)
    machine = cpu()
    root = args.cache.expanduser() / "llamacpp" / VERSION
    logs = args.cache.expanduser() / "vs_llamacpp" / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    CONSOLE.log(
        f"CPU: {machine['model']}, {machine['cores']} cores; "
        + ", ".join(f"{f} {'yes' if machine[f] else 'no'}" for f in CPU_FLAGS)
    )

    tree, commit = fetch_tree(root)
    stock = build(tree, root / "build-stock", "stock")
    if machine["amx_tile"]:  # the stock build crashes here unless --repack 0 keeps q8_0/q4_0 off the AMX path
        main_variant = Variant(
            "AMX barrier patched", build(patched_tree(tree, root), root / "build-amx-barrier", "AMX barrier"), True, True
        )
        about = "AMX CPU: stock llama.cpp is run with --repack 0 (its AMX path crashes, #20824); repack on runs on a patched copy"
    else:
        main_variant = Variant("stock", stock, True, True)
        about = "no AMX on this CPU: the AMX path is not compiled, so stock llama.cpp runs with its default repack"
    variants = [main_variant, Variant(NO_REPACK, stock, False, False)]
    CONSOLE.log(
        f"llama.cpp {commit} (vendored by llama-cpp-python {VERSION}); {about}; flash attention: llama-bench's default (auto)"
    )

    python = converter_python(root, tree)
    n_layer = args.layers or RefactConfig().n_layer
    folder = make_checkpoint(args.cache.expanduser() / "models" / f"refact-1.6b-random-{n_layer}L", args.layers)
    ggufs = {fmt: make_gguf(GGUF_TYPES[fmt], folder, tree, stock, python) for fmt in formats}
    stats = {fmt: gguf_stats(ggufs[fmt], tree, python) for fmt in formats}
    checkpoints = {fmt: midfill_checkpoint(fmt, folder) for fmt in formats}

    bandwidth = Bandwidth()
    bandwidth.measure(passes=2)  # warm both readers
    readings: list[dict] = []
    midfill: dict[str, list[dict]] = {fmt: [] for fmt in formats}
    llama: dict[str, dict[str, list[dict]]] = {fmt: {v.name: [] for v in variants} for fmt in formats}
    for round_ in range(args.rounds):
        for fmt in formats:  # llama.cpp and midfill take turns, so drift in the machine's speed hits both
            for variant in [v for v in variants if v.every_round or round_ == 0]:
                readings.append(conditions(bandwidth))
                llama[fmt][variant.name].append({**llama_bench(variant, ggufs[fmt], args, logs, round_), **readings[-1]})
            readings.append(conditions(bandwidth))
            midfill[fmt].append({**midfill_run(fmt, checkpoints[fmt], args, logs, round_), **readings[-1]})

    rows = [summarize(fmt, midfill[fmt], llama[fmt], stats[fmt], main_variant.name) for fmt in formats]
    CONSOLE.print(table(rows, args, main_variant.name, readings))
    for fmt in formats:
        for name, runs in [("midfill", midfill[fmt]), *llama[fmt].items()]:
            for r in runs:
                if "error" in r:
                    CONSOLE.log(f"[red]{fmt}, {name}: {r['error']}[/] (log: {r['log']})")
    report = {
        "command": sys.argv,
        "cpu": machine,
        "llamacpp": {
            "commit": commit,
            "llama_cpp_python": VERSION,
            "configurations": [v.name for v in variants],
            "note": about,
            "flash_attention": "llama-bench default (auto)",
            "repetitions_per_process": 1,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "one"},
        "checkpoint": str(folder),
        "conditions": readings,
        "rows": rows,
        "runs": {"midfill": midfill, "llamacpp": llama},
    }
    out = args.out or logs / "vs_llamacpp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    CONSOLE.log(f"results: {out}; logs: {logs}")


if __name__ == "__main__":
    main()
