"""One request's life: prefill from an optional cached prefix, then sample, stop and assemble text.

A Sequence owns everything about one generation but the KV memory and the batch it decodes in,
which the Engine (scheduler.py) owns: every generation midfill runs, from the server, the CLI,
`generate()`, the evaluation or a finetune's report, goes through this one path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from midfill.engine.assembler import TextAssembler
from midfill.engine.healing import RequiredPrefix, healing_wanted
from midfill.engine.prefix_cache import PrefixCache
from midfill.engine.request import Finished, GenerationRequest, GenerationResult, TextDelta
from midfill.engine.sampling import Sampler
from midfill.engine.speculate import PRIOR_ACCEPTANCE, DraftPolicy, NgramIndex, PassTimes
from midfill.model import GPTRefactForCausalLM, KVCache
from midfill.tokenizer import Tokenizer

log = logging.getLogger("midfill.engine")

# Prefill in slices so the attention bias of a long prompt stays small ([T*H, S] floats per slice).
PREFILL_CHUNK = 512

Event = TextDelta | Finished
EventSink = Callable[[Event], None]


def run_prompt(model: GPTRefactForCausalLM, slab: KVCache, row: int, prompt: list[int], start: int) -> torch.Tensor:
    """Prefill prompt[start:] into `row` after its first `start` tokens' KV; the last position's logits [1, V]."""
    slab.lengths[row] = start
    ids = torch.tensor(prompt, device=model.device)
    view = slab.rows(row, row + 1)
    for chunk in range(start, len(prompt), PREFILL_CHUNK):
        logits = model(ids[None, chunk : chunk + PREFILL_CHUNK], cache=view, last_only=True)
    return logits[:, -1]


class Sequence:
    """A request being generated: its tokens, sampler, text and stop state."""

    def __init__(self, request: GenerationRequest, sink: EventSink, tok: Tokenizer | None, device: torch.device,
                 submitted_at: float, assembler: TextAssembler | None = None, prior_acceptance: float = PRIOR_ACCEPTANCE) -> None:
        self.request = request
        self.sink = sink
        # without a tokenizer (ids in, ids out: `generate`), there is no text and no stop string
        self.tok = tok
        self.assembler = assembler or (TextAssembler(tok, request.rules) if tok else None)
        self.required: RequiredPrefix | None = None  # set when the prompt is healed
        self.sampler = Sampler(request.sampling, device)
        self.tokens = list(request.prompt_ids)  # prompt, then every sampled token
        self.n_prompt = len(self.tokens)  # the prompt's share of `tokens` (one fewer once healed)
        self.submitted_at = submitted_at
        self.seen: torch.Tensor | None = None  # [1, V] tokens in context, for the repetition penalty
        self.cached_tokens = 0
        self.prompt_ms = 0.0
        self.first_token_at: float | None = None
        self.n_sampled = 0
        self.next_token = -1  # sampled, to be fed at the next decode step
        self.finish_reason: str | None = None
        self.lookup: NgramIndex | None = None  # built at the first draft that pays, then kept up to date (speculate.py)
        self.policy = DraftPolicy(accepted=prior_acceptance)

    @property
    def generated(self) -> list[int]:
        """The sampled token ids, without the stop id that ended them."""
        ids = self.tokens[self.n_prompt :]
        return ids[:-1] if self.finish_reason == "eos" else ids

    def prefill(self, model: GPTRefactForCausalLM, slab: KVCache, row: int, cache: PrefixCache) -> None:
        """Run the prompt's uncached tail into `row` of the slab and sample the first token.

        With max_new_tokens == 0 (llama.cpp's n_predict 0) only the prompt runs, to warm the cache.
        """
        started = time.perf_counter()
        prompt = self.request.prompt_ids
        n_cached, entry = cache.lookup(torch.tensor(prompt, device=model.device)) if self.request.cache_prompt else (0, None)
        n_use = min(n_cached, len(prompt) - 1)  # at least one token must run to give logits
        if entry is not None and n_use > 0:
            slab.k[:, row, :n_use] = entry.k[:, :n_use]
            slab.v[:, row, :n_use] = entry.v[:, :n_use]
        logits = run_prompt(model, slab, row, prompt, n_use)
        healed = self.request.healed_prompt_ids
        if healed is not None and self.request.max_new_tokens > 0 and self.tok is not None:
            logits = self.heal_if_wanted(model, slab, row, healed, logits)
        self.cached_tokens = n_use
        self.prompt_ms = (time.perf_counter() - started) * 1000
        if self.request.sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=model.device)
            self.seen[0, torch.tensor(self.tokens, device=model.device)] = True
        if self.request.max_new_tokens == 0:  # a cache warm-up: the prompt's KV is all it wanted
            self.finish_reason = "length"
            return
        self.sample(logits)

    def heal_if_wanted(self, model: GPTRefactForCausalLM, slab: KVCache, row: int, healed: list[int],
                       logits: torch.Tensor) -> torch.Tensor:
        """Switch to the healed prompt when the model's own next token would merge with the prefix's
        last one (so a cut the tokenizer itself makes is answered exactly as without healing);
        return the logits to sample the first token from."""
        prompt = self.request.prompt_ids
        keep = next((i for i, (a, b) in enumerate(zip(prompt, healed)) if a != b), len(healed))
        wanted = healing_wanted(self.tok, prompt[keep], int(logits[0].argmax()), self.request.stop_ids)
        if wanted is None:
            return logits
        slab.lengths[row] = keep  # the rows' KV up to the backed-off token is the healed prompt's too
        self.tokens, self.n_prompt = list(healed), len(healed)
        self.required = RequiredPrefix(self.tok, wanted)
        self.assembler.skip = wanted
        return run_prompt(model, slab, row, healed, keep)

    def sample(self, logits: torch.Tensor) -> int:
        """Sample the next token from logits [1, V] and take it; a failure ends this sequence alone."""
        try:
            healing = self.required is not None and not self.required.done
            if healing:
                logits = self.required.mask(logits)
            token = int(self.sampler(logits, self.seen)[0])
            if healing:
                self.required.advance(token)
        except Exception:
            self.finish_reason = "error"
            raise
        self.accept(token)
        return token

    def draft(self, rows: int, times: PassTimes) -> list[int]:
        """Tokens to verify after next_token in a pass that already has `rows` rows: a prompt-lookup
        draft as long as pays (speculate.py), none while healing or when the request opted out."""
        if not self.request.speculate or self.finish_reason is not None or (self.required and not self.required.done):
            return []
        limit = self.request.max_new_tokens - self.n_sampled  # a guess for each token still wanted
        length = self.policy.length(rows, times, limit)
        if length == 0:
            return []  # no index yet where drafting does not pay: indexing a long prompt costs more than a short answer
        if self.lookup is None:
            self.lookup = NgramIndex(self.tokens)
        return self.lookup.draft(length)

    def take(self, logits: torch.Tensor, draft: list[int]) -> int:
        """Verify a draft with logits [1 + len(draft), V] of next_token and the drafted tokens: take
        the sampled tokens while they agree with it, plus the one after. Returns how many of those
        rows' keys and values to keep (next_token's and those of the accepted drafted tokens).

        Each row samples as it would without a draft, and a drafted token stands only if the sample
        equals it. For a draft that is one fixed token (a lookup, not a draft model) this is the
        speculative-sampling rule itself: the guess g is kept with probability q(g) and otherwise the
        token comes from q without g, renormalised. And because every emitted token takes one draw
        from the request's generator, as without drafts, a seeded request gives the same text
        whatever the draft lengths were."""
        kept = accepted = 0
        for j in range(len(draft) + 1):
            guess = draft[j] if j < len(draft) else None
            token = self.sample(logits[j : j + 1])
            kept += 1
            accepted += token == guess
            if token != guess or self.finish_reason is not None:
                break
        self.policy.verdict(len(draft), accepted)
        return kept

    def accept(self, token: int) -> None:
        """Take one sampled token: stream its text, or decide that the sequence is done."""
        now = time.perf_counter()
        self.first_token_at = self.first_token_at or now
        self.tokens.append(token)
        self.n_sampled += 1
        request = self.request
        if token in request.stop_ids:
            self.finish_reason = "eos"
            return
        if self.assembler is not None:
            delta = self.assembler.push(token)
            if delta:
                self.emit(TextDelta(delta))
        if self.assembler is not None and self.assembler.done:
            self.finish_reason = "stop"
        elif self.n_sampled >= request.max_new_tokens:
            self.finish_reason = "length"
        elif (
            request.ms_after_first_token is not None
            and (now - self.first_token_at) * 1000 > request.ms_after_first_token
            and "\n" in (self.assembler.text if self.assembler else "")
        ):
            self.finish_reason = "time"
        else:
            self.next_token = token
            if self.seen is not None:
                self.seen[0, token] = True
        if self.lookup is not None:
            self.lookup.extend([token])

    def finish(self) -> None:
        """Flush the last text and report the result."""
        if self.assembler is not None and not self.assembler.done:
            # the assembler's reason is the text's: an end-of-text token stopped it like a stop rule
            delta = self.assembler.finish("length" if self.finish_reason == "length" else "stop")
            if delta:
                self.emit(TextDelta(delta))
        self.emit(Finished(self.result()))

    def result(self) -> GenerationResult:
        end = time.perf_counter()
        first = self.first_token_at or end
        return GenerationResult(
            text=self.assembler.text if self.assembler else "",
            finish_reason=self.finish_reason or "stop",
            prompt_tokens=self.n_prompt,
            completion_tokens=self.n_sampled,
            cached_tokens=self.cached_tokens,
            prompt_ms=self.prompt_ms,
            predicted_ms=(end - first) * 1000,
            ttft_ms=(first - self.submitted_at) * 1000,
            stopping_word=self.assembler.stopping_word if self.assembler else "",
            token_ids=self.generated,
            drafted_tokens=self.policy.drafted_total,
            accepted_tokens=self.policy.accepted_total,
        )

    def emit(self, event: Event) -> None:
        emit(self.sink, event)


def emit(sink: EventSink, event: Event) -> None:
    """Hand an event to a request's sink; a sink that fails is a bug there, logged, but must not stop the engine."""
    try:
        sink(event)
    except Exception:
        log.exception("a request's event sink failed")
