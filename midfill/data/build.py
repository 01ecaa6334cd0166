"""`midfill data build`: sources -> filters -> exact and near dedup -> tokenized, packed shards.

Three stages, each writing its output under the build folder and a DONE marker when complete;
a rerun skips finished stages, and inside the filter stage, finished chunks. Work is spread over
a process pool; documents stream through, so the corpus may be larger than memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from midfill.data.dedup import Deduplicator, exact_key, minhash_signature
from midfill.data.documents import Document
from midfill.data.filters import FilterConfig, reject_reason
from midfill.data.packing import ShardWriter, token_dtype, write_manifest
from midfill.data.sources import iter_source
from midfill.errors import MidfillError
from midfill.files import write_text_atomic
from midfill.processes import worker_pool
from midfill.tokenizer import Tokenizer, load_tokenizer

Progress = Callable[[str, int], None]  # (stage, documents just processed)


@dataclass
class BuildConfig:
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: bool = True  # off only to measure what dedup buys (the recipe's ablation)
    near_dedup_threshold: float = 0.7
    redis: tuple[str, int] | None = None
    val_fraction: float = 0.01
    shard_tokens: int = 2**24
    chunk_docs: int = 256
    workers: int = max(1, (os.cpu_count() or 1))


def read_jsonl(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [Document.from_dict(json.loads(line)) for line in f if line.strip()]


def write_jsonl(path: Path, docs: list[Document]) -> None:
    write_text_atomic(path, "".join(json.dumps(d.to_dict(), ensure_ascii=False) + "\n" for d in docs))


def nbytes(docs: list[Document]) -> int:
    return sum(len(d.text.encode("utf-8", errors="replace")) for d in docs)


# --- stage 1: filters ---


def filter_chunk(docs: list[Document], config: FilterConfig) -> tuple[list[Document], dict]:
    kept, reasons = [], Counter()
    for doc in docs:
        reason = reject_reason(doc, config)
        if reason is None:
            kept.append(doc)
        else:
            reasons[reason] += 1
    stats = {"docs_in": len(docs), "bytes_in": nbytes(docs), "docs_out": len(kept), "bytes_out": nbytes(kept),
             "rejected": dict(reasons)}
    return kept, stats


def chunks(sources: list[str], size: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for source in sources:
        for doc in iter_source(source):
            chunk.append(doc)
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def stage_filter(sources: list[str], folder: Path, config: BuildConfig, progress: Progress) -> dict:
    out = folder / "filtered"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "DONE").exists():
        todo = ((i, docs) for i, docs in enumerate(chunks(sources, config.chunk_docs)) if not (out / f"part-{i:06d}.stats.json").exists())
        with worker_pool(config.workers) as executor:
            pending = {}
            for index, docs in todo:
                pending[index] = executor.submit(filter_chunk, docs, config.filters)
                if len(pending) >= 2 * config.workers:
                    finish_filter_chunk(out, pending, progress)
            while pending:
                finish_filter_chunk(out, pending, progress)
        write_text_atomic(out / "DONE", "")
    totals = {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0, "rejected": Counter()}
    for stats_file in sorted(out.glob("part-*.stats.json")):
        stats = json.loads(stats_file.read_text())
        for key in ("docs_in", "bytes_in", "docs_out", "bytes_out"):
            totals[key] += stats[key]
        totals["rejected"].update(stats["rejected"])
    totals["rejected"] = dict(totals["rejected"])
    return totals


def finish_filter_chunk(out: Path, pending: dict, progress: Progress) -> None:
    index = min(pending)
    kept, stats = pending.pop(index).result()
    write_jsonl(out / f"part-{index:06d}.jsonl", kept)
    write_text_atomic(out / f"part-{index:06d}.stats.json", json.dumps(stats))  # written last: marks the chunk done
    progress("filter", stats["docs_in"])


# --- stage 2: dedup ---


def signatures(path: Path) -> tuple[list[Document], list]:
    docs = read_jsonl(path)
    return docs, [minhash_signature(d.text) for d in docs]


def stage_dedup(folder: Path, config: BuildConfig, progress: Progress) -> dict:
    source, out = folder / "filtered", folder / "dedup"
    stats_path = out / "stats.json"
    if (out / "DONE").exists():
        return json.loads(stats_path.read_text())
    shutil.rmtree(out, ignore_errors=True)  # an interrupted dedup starts over: its index was in memory
    out.mkdir(parents=True)
    dedup = Deduplicator(threshold=config.near_dedup_threshold, redis=config.redis)
    stats = {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0}
    parts = sorted(source.glob("part-*.jsonl"))
    with worker_pool(config.workers) as executor:
        read = executor.map(signatures, parts) if config.dedup else ((read_jsonl(path), None) for path in parts)
        for path, (docs, sigs) in zip(parts, read):
            kept = [d for d, s in zip(docs, sigs) if dedup.keep(d.text, s)] if config.dedup else docs
            write_jsonl(out / path.name, kept)
            for key, group in (("in", docs), ("out", kept)):
                stats[f"docs_{key}"] += len(group)
                stats[f"bytes_{key}"] += nbytes(group)
            progress("dedup", len(docs))
    stats.update(exact_duplicates=dedup.exact_duplicates, near_duplicates=dedup.near_duplicates)
    write_text_atomic(stats_path, json.dumps(stats))
    write_text_atomic(out / "DONE", "")
    return stats


# --- stage 3: tokenize and pack ---

_worker_tokenizer: Tokenizer | None = None


def _load_worker_tokenizer(path: str) -> None:
    global _worker_tokenizer  # one tokenizer per worker process, loaded once
    _worker_tokenizer = load_tokenizer(path)


def tokenize_part(path: Path, val_fraction: float) -> list[tuple[np.ndarray, str, str]]:
    tok = _worker_tokenizer
    out = []
    for doc in read_jsonl(path):
        # the split is a function of the content, so it is the same however the build is run
        split = "val" if int(exact_key(doc.text)[:8], 16) / 16**8 < val_fraction else "train"
        ids = np.array(tok.encode(doc.text) + [tok.eot_id], dtype=np.int64)
        out.append((ids, doc.lang or "unknown", split))
    return out


def stage_pack(folder: Path, tokenizer_path: Path, config: BuildConfig, progress: Progress) -> dict:
    tok = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    shards = folder / "tokens"
    shutil.rmtree(shards, ignore_errors=True)
    shards.mkdir(parents=True)
    writers = {split: ShardWriter(shards, split, dtype, config.shard_tokens) for split in ("train", "val")}
    per_language: Counter = Counter()
    docs_per_split: Counter = Counter()
    parts = sorted((folder / "dedup").glob("part-*.jsonl"))
    with worker_pool(config.workers, _load_worker_tokenizer, (str(tokenizer_path),)) as executor:
        for results in executor.map(tokenize_part, parts, [config.val_fraction] * len(parts)):
            for ids, lang, split in results:
                writers[split].write(ids)
                per_language[lang] += len(ids)
                docs_per_split[split] += 1
            progress("pack", len(results))
    splits = {split: [{**s, "file": f"tokens/{s['file']}"} for s in w.close()] for split, w in writers.items()}
    shutil.copy(tokenizer_path, folder / "tokenizer.json")
    return {"splits": splits, "dtype": dtype.name, "eot_id": tok.eot_id, "vocab_size": tok.vocab_size,
            "tokens_per_language": dict(per_language), "documents_per_split": dict(docs_per_split)}


def build_dataset(sources: list[str], out: str | Path, tokenizer_path: str | Path, config: BuildConfig,
                  progress: Progress = lambda stage, n: None) -> dict:
    """Run (or resume) the whole pipeline; return the manifest it wrote to `out`/manifest.json."""
    folder, tokenizer_path = Path(out), Path(tokenizer_path)
    if not sources:
        raise MidfillError("no sources given; pass folders, git repositories or .jsonl/.parquet shards")
    load_tokenizer(tokenizer_path)  # fail early on a bad tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool forks; let processes parallelize
    folder.mkdir(parents=True, exist_ok=True)
    filtered = stage_filter(sources, folder, config, progress)
    deduped = stage_dedup(folder, config, progress)
    packed = stage_pack(folder, tokenizer_path, config, progress)
    total = sum(s["tokens"] for split in packed["splits"].values() for s in split)
    manifest = {
        "version": 1,
        "sources": [str(s) for s in sources],
        "tokenizer": "tokenizer.json",
        **packed,
        "stages": {"filter": filtered, "dedup": deduped, "pack": {"docs_in": deduped["docs_out"], "tokens_out": total}},
        "config": json.loads(json.dumps(asdict(config), default=lambda o: sorted(o) if isinstance(o, set) else str(o))),
    }
    write_manifest(folder, manifest)
    return manifest
