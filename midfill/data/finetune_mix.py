"""`midfill data fim-synth`: the finetune mix, 85% synthetic FIM and 15% instructions by default,
tokenized into example shards with a target mask beside them."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from midfill.data.documents import Document
from midfill.data.fim_synth import SynthConfig, example_tokens, synthesize
from midfill.data.instructions import instruction_pairs, pair_tokens
from midfill.data.packing import ShardWriter, token_dtype, write_manifest
from midfill.errors import MidfillError
from midfill.tokenizer import Tokenizer

VAL_EVERY = 50  # one example in 50 is held out for the finetune's eval loss
MAX_TRIES_PER_EXAMPLE = 50  # cuts that do not fit are retried, up to this many per example asked for


@dataclass
class MixConfig:
    examples: int = 20000
    instruct_fraction: float = 0.15
    max_tokens: int = 512  # longer examples are skipped (they would not fit a training block)
    seed: int = 0
    synth: SynthConfig = field(default_factory=SynthConfig)


def build_finetune_mix(docs: list[Document], tok: Tokenizer, tokenizer_path: Path, out: Path, config: MixConfig) -> dict:
    """Write example shards for `docs` (already filtered) to `out`; return the manifest."""
    if not docs:
        raise MidfillError("no usable source files for the finetune mix")
    rng = random.Random(config.seed)
    n_instruct = round(config.examples * config.instruct_fraction)
    pairs = [p for d in docs if d.lang == "python" for p in instruction_pairs(d.text)]
    if n_instruct and not pairs:
        raise MidfillError("no documented Python functions found for instruction pairs; add Python sources or set --instruct-fraction 0")
    if config.synth.prompt_tokens + 8 > config.max_tokens:
        raise MidfillError(f"max_tokens {config.max_tokens} leaves no room after a {config.synth.prompt_tokens}-token prompt")
    weights = [len(d.text) for d in docs]
    examples: list[tuple[list[int], list[bool], str]] = []
    for _ in range(MAX_TRIES_PER_EXAMPLE * config.examples):
        if len(examples) >= config.examples - n_instruct:
            break
        example = synthesize(rng.choices(docs, weights=weights)[0].text, rng, config.synth)
        if example is not None:
            ids, mask = example_tokens(tok, example, rng.random() < config.synth.spm_rate, config.synth.prompt_tokens)
            if len(ids) <= config.max_tokens:
                examples.append((ids, mask, example.kind))
    for _ in range(MAX_TRIES_PER_EXAMPLE * config.examples):
        if len(examples) >= config.examples:
            break
        pair = rng.choice(pairs)
        ids, mask = pair_tokens(tok, pair)
        if len(ids) <= config.max_tokens:
            examples.append((ids, mask, f"instruct-{pair.kind}"))
    if len(examples) < config.examples:
        raise MidfillError(f"could cut only {len(examples)} of {config.examples} examples that fit {config.max_tokens} tokens; "
                           "add sources or raise max_tokens")
    rng.shuffle(examples)

    shards = out / "tokens"
    shards.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    writers = {split: (ShardWriter(shards, split, dtype, 2**24), ShardWriter(shards, f"{split}-mask", np.dtype(np.uint8), 2**24))
               for split in ("train", "val")}
    kinds: Counter = Counter()
    for index, (ids, mask, kind) in enumerate(examples):
        ids_writer, mask_writer = writers["val" if index % VAL_EVERY == VAL_EVERY - 1 else "train"]
        ids_writer.write(np.array(ids))
        mask_writer.write(np.array(mask, dtype=np.uint8))
        kinds[kind] += 1
    splits = {}
    for split, (ids_writer, mask_writer) in writers.items():
        splits[split] = [{"file": f"tokens/{s['file']}", "tokens": s["tokens"], "mask": f"tokens/{m['file']}"}
                         for s, m in zip(ids_writer.close(), mask_writer.close())]
    (out / "tokenizer.json").write_text(Path(tokenizer_path).read_text(encoding="utf-8"), encoding="utf-8")
    manifest = {
        "version": 1, "kind": "examples", "tokenizer": "tokenizer.json", "dtype": dtype.name, "eot_id": tok.eot_id,
        "vocab_size": tok.vocab_size, "splits": splits, "examples_per_kind": dict(kinds),
        "instruction_pairs_available": len(pairs), "config": asdict(config),
    }
    write_manifest(out, manifest)
    return manifest
