"""Autoregressive generation with a KV cache: chunked prefill, then one-token decode steps."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from midfill.engine.assembler import TextAssembler
from midfill.engine.sampling import Sampler, SamplingParams
from midfill.errors import MidfillError
from midfill.model import GPTRefactForCausalLM, KVCache
from midfill.model.decode_step import decode_one

# Prefill in slices so the attention bias of a long prompt stays small ([T*H, S] floats per slice).
PREFILL_CHUNK = 512


def as_batch(input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise MidfillError(f"input_ids must be a non-empty sequence of token ids, got shape {tuple(ids.shape)}")
    return ids


@torch.inference_mode()
def decode_steps(
    model: GPTRefactForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampler: Sampler,
    attention_mask: torch.Tensor | None = None,
    repetition_penalty: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] of every row, step after step, up to max_new_tokens steps.

    The caller decides when a row is finished and stops iterating when all are.
    """
    batch, n_prompt = input_ids.shape
    context = model.config.n_positions
    if n_prompt + max_new_tokens > context:
        raise MidfillError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's context of "
            f"{context}; shorten the prompt or ask for fewer tokens"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = torch.cat([attention_mask.to(input_ids.device).long(), input_ids.new_ones(batch, max_new_tokens)], dim=1)
    cache = KVCache.allocate(model.config, batch, n_prompt + max_new_tokens, model.dtype, model.device)
    seen = None
    if repetition_penalty:
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=input_ids.device)
        seen.scatter_(1, input_ids, attention_mask.bool().to(input_ids.device))

    for start in range(0, n_prompt, PREFILL_CHUNK):
        end = min(start + PREFILL_CHUNK, n_prompt)
        logits = model(input_ids[:, start:end], attention_mask=mask[:, :end], cache=cache)[:, -1]
    rows = torch.arange(batch, device=input_ids.device)
    for step in range(max_new_tokens):
        next_ids = sampler(logits, seen)
        yield next_ids
        if step == max_new_tokens - 1:
            return
        if seen is not None:
            seen[rows, next_ids] = True
        logits = decode_one(model, next_ids, cache, mask[:, : cache.span + 1])


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
    """
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
    ids = as_batch(input_ids, model.device)
    stops = set(stop_ids) if stop_ids is not None else {model.config.eos_token_id}
    outputs: list[list[int]] = [[] for _ in range(ids.shape[0])]
    finished = [False] * ids.shape[0]
    sampler = Sampler(params, model.device)
    for step in decode_steps(model, ids, max_new_tokens, sampler, attention_mask, repetition_penalty != 1.0):
        for row, token in enumerate(step.tolist()):
            if finished[row]:
                continue
            if token in stops:
                finished[row] = True
            else:
                outputs[row].append(token)
        if all(finished):
            break
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
    stops = set(stop_ids) if stop_ids is not None else {model.config.eos_token_id}
    sampler = Sampler(sampling, model.device)
    ids = as_batch(prompt_ids, model.device)
    for step in decode_steps(model, ids, max_new_tokens, sampler, repetition_penalty=sampling.repetition_penalty != 1.0):
        token = int(step[0])
        delta = assembler.finish("stop") if token in stops else assembler.push(token)
        if delta:
            yield delta
        if assembler.done:
            return
    delta = assembler.finish("length")
    if delta:
        yield delta
