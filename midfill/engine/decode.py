"""`generate` and `stream_text`: the library's calls, run by the same engine that serves requests.

Each call makes an engine that is not started (no thread, no prefix cache) sized to its rows,
queues one request per row and drives it to the end in the caller's thread, so the library,
the CLI, the evaluation and the server share one prefill, one decode loop and one sampler.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from midfill.engine.assembler import TextAssembler
from midfill.engine.request import Finished, GenerationRequest, GenerationResult, TextDelta
from midfill.engine.sampling import SamplingParams
from midfill.engine.scheduler import Engine
from midfill.errors import MidfillError
from midfill.model import GPTRefactForCausalLM


def as_batch(input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise MidfillError(f"input_ids must be a non-empty sequence of token ids, got shape {tuple(ids.shape)}")
    return ids


def local_engine(model: GPTRefactForCausalLM, rows: int, span: int, tok=None) -> Engine:
    """An engine whose KV slab holds `rows` sequences of `span` tokens, not the whole context."""
    return Engine(model, tok, max_batch=rows, max_queue=rows, ctx=span, prefix_cache_mb=0)


def check_room(model: GPTRefactForCausalLM, n_prompt: int, max_new_tokens: int) -> None:
    if n_prompt + max_new_tokens > model.config.n_positions:
        raise MidfillError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's context of "
            f"{model.config.n_positions}; shorten the prompt or ask for fewer tokens"
        )


def generate(
    model: GPTRefactForCausalLM,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    stop_ids: Iterable[int] | None = None,
) -> list[int] | list[list[int]]:
    """New token ids: a list of ints for one sequence, a list of lists for a batch.

    A row ends at a stop id (default: the config's eos_token_id), which is not included, or
    after max_new_tokens. Batches may be left-padded, with attention_mask marking real tokens.
    Row i samples with seed + i, so a seeded batch repeats.
    """
    ids = as_batch(input_ids)
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).bool()
    check_room(model, ids.shape[1], max_new_tokens)
    stops = frozenset(stop_ids if stop_ids is not None else {model.config.eos_token_id})
    engine = local_engine(model, ids.shape[0], ids.shape[1] + max_new_tokens)
    results: list[GenerationResult | None] = [None] * ids.shape[0]
    for row in range(ids.shape[0]):
        sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, None if seed is None else seed + row)
        prompt = ids[row][mask[row].bool()].tolist()  # ALiBi: a left-padded row is the same as the unpadded one
        engine.submit(GenerationRequest(prompt, max_new_tokens, sampling, stop_ids=stops, cache_prompt=False),
                      lambda event, row=row: results.__setitem__(row, event.result) if isinstance(event, Finished) else None)
    engine.drive()
    outputs = [result.token_ids for result in results]
    return outputs[0] if len(outputs) == 1 else outputs


def stream_text(
    model: GPTRefactForCausalLM,
    prompt_ids: Sequence[int],
    assembler: TextAssembler,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: Iterable[int] | None = None,
) -> Iterator[str]:
    """Yield text deltas of one completion as they become final; `assembler` holds the result."""
    prompt = as_batch(prompt_ids)[0].tolist()
    check_room(model, len(prompt), max_new_tokens)
    stops = frozenset(stop_ids if stop_ids is not None else {model.config.eos_token_id})
    engine = local_engine(model, 1, len(prompt) + max_new_tokens, assembler.tok)
    deltas: list[str] = []
    engine.submit(GenerationRequest(prompt, max_new_tokens, sampling, assembler.rules, stops, cache_prompt=False),
                  lambda event: deltas.append(event.text) if isinstance(event, TextDelta) else None, assembler=assembler)
    while engine.pending or engine.active:
        engine.step()
        yield from deltas
        deltas.clear()
