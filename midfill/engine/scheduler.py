"""The serving engine: one thread that owns the model and serves many requests at once.

Continuous batching: requests join and leave between decode steps. Every active sequence has a
row in one preallocated KV slab; rows stay packed (a finished row is refilled by the last one),
so a decode step is one forward pass over rows 0..B-1. A new request first takes the longest
cached token prefix from the PrefixCache and prefills only the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from midfill.engine.assembler import TextAssembler
from midfill.engine.decode import PREFILL_CHUNK
from midfill.engine.healing import RequiredPrefix
from midfill.engine.prefix_cache import PrefixCache
from midfill.engine.request import Finished, GenerationRequest, GenerationResult, TextDelta
from midfill.engine.sampling import Sampler
from midfill.errors import MidfillError
from midfill.model import GPTRefactForCausalLM, KVCache
from midfill.model.decode_step import decode_one
from midfill.tokenizer import Tokenizer

log = logging.getLogger("midfill.engine")

Event = TextDelta | Finished
EventSink = Callable[[Event], None]


class EngineUnavailable(Exception):
    """The engine cannot take a request now (stopped, or its queue is full); the client should retry."""


class QueueFull(EngineUnavailable):
    """More requests are waiting than the engine was told to queue."""


@dataclass
class Sequence:
    request: GenerationRequest
    sink: EventSink
    assembler: TextAssembler
    sampler: Sampler
    tokens: list[int]  # prompt, then every sampled token
    submitted_at: float
    seen: torch.Tensor | None = None  # [1, V] tokens in context, for the repetition penalty
    cached_tokens: int = 0
    prompt_ms: float = 0.0
    first_token_at: float | None = None
    n_sampled: int = 0
    next_token: int = -1  # sampled, to be fed at the next decode step
    required: RequiredPrefix | None = None  # what a healed prompt's answer must still spell
    finish_reason: str | None = None


@dataclass
class Pending:
    request: GenerationRequest
    sink: EventSink
    submitted_at: float = field(default_factory=time.perf_counter)


class Engine:
    def __init__(
        self,
        model: GPTRefactForCausalLM,
        tok: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        ctx: int | None = None,
        prefix_cache_mb: float = 256.0,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise MidfillError("--max-batch must be >= 1 and --max-queue >= 0")
        self.model = model
        self.tok = tok
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.ctx = min(ctx or model.config.n_positions, model.config.n_positions)
        self.slab = KVCache.allocate(model.config, max_batch, self.ctx, model.dtype, model.device)
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20))
        self.active: list[Sequence] = []
        self.pending: deque[Pending] = deque()
        self.wakeup = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        return sum(not item.request.cancelled.is_set() for item in self.pending)

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="midfill-engine", daemon=True)
        self.thread.start()

    def stop(self) -> int:
        """Stop the engine thread, cancelling what is queued or running; return how many that was."""
        with self.wakeup:
            self.running = False
            unfinished = len(self.pending) + len(self.active)
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join()
        return unfinished

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        """Queue a request; its events go to `sink`, called from the engine thread."""
        n_prompt = len(request.prompt_ids)
        if n_prompt == 0:
            raise MidfillError("the prompt is empty")
        if n_prompt + request.max_new_tokens > self.ctx:
            raise MidfillError(
                f"prompt ({n_prompt} tokens) + max tokens ({request.max_new_tokens}) exceed the context of {self.ctx} tokens"
            )
        with self.wakeup:
            if self.thread is not None and not self.alive:  # started once, stopped since
                raise EngineUnavailable("the engine is not running")
            self._drop_cancelled_pending()
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are already waiting")
            self.pending.append(Pending(request, sink))
            self.wakeup.notify()

    def _drop_cancelled_pending(self) -> None:
        """Answer queued requests whose client has gone, so they stop taking room in the queue."""
        if any(item.request.cancelled.is_set() for item in self.pending):
            gone = [item for item in self.pending if item.request.cancelled.is_set()]
            self.pending = deque(item for item in self.pending if not item.request.cancelled.is_set())
            for item in gone:
                self._emit(item.sink, Finished(GenerationResult.empty(item.request, "cancelled")))

    # --- the engine thread ---

    def _next_admissions(self) -> list[Pending]:
        """Take queued requests in order while rows are free, skipping (for now) those whose serial
        group already runs or was skipped: a group's requests run one after another."""
        room = self.max_batch - len(self.active)
        busy = {seq.request.serial_group for seq in self.active} - {None}
        admitted, waiting = [], deque()
        while self.pending:
            item = self.pending.popleft()
            group = item.request.serial_group
            if len(admitted) < room and (group is None or group not in busy):
                admitted.append(item)
            else:
                waiting.append(item)
            if group is not None:
                busy.add(group)
        self.pending = waiting
        return admitted

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running (what /health reports)."""
        return self.running and self.thread is not None and self.thread.is_alive()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wakeup:
                    while self.running and not self.pending and not self.active:
                        self.wakeup.wait()
                    if not self.running:
                        break
                    admitted = self._next_admissions()
                try:
                    self._iterate(admitted)
                except Exception:  # a bug must fail the requests it touched, never the thread
                    log.exception("engine step failed; failing the batch")
                    self._fail_active()
        for seq in self.active:
            seq.finish_reason = "cancelled"
        self._retire()
        for item in self.pending:
            self._emit(item.sink, Finished(GenerationResult.empty(item.request, "cancelled")))

    def _iterate(self, admitted: list[Pending]) -> None:
        for item in admitted:
            self._admit(item)
        self._retire()
        if self.active:
            try:
                self._step()
            except Exception:
                log.exception("decode step failed; failing the batch")
                for seq in self.active:
                    seq.finish_reason = seq.finish_reason or "error"
            self._retire()

    def _admit(self, item: Pending) -> None:
        request = item.request
        try:
            seq = Sequence(
                request=request,
                sink=item.sink,
                assembler=TextAssembler(self.tok, request.rules, skip=request.required_prefix),
                sampler=Sampler(request.sampling, self.model.device),
                tokens=list(request.prompt_ids),
                submitted_at=item.submitted_at,
                required=RequiredPrefix(self.tok, request.required_prefix) if request.required_prefix else None,
            )
        except Exception:
            log.exception("a request could not be admitted")
            self._emit(item.sink, Finished(GenerationResult.empty(request, "error")))
            return
        self.active.append(seq)
        if request.cancelled.is_set():
            seq.finish_reason = "cancelled"
        else:
            try:
                self._prefill(seq, row=len(self.active) - 1)
            except Exception:
                log.exception("prefill failed")
                seq.finish_reason = "error"

    def _prefill(self, seq: Sequence, row: int) -> None:
        """Run the prompt's uncached tail into the sequence's row and sample its first token.

        With max_new_tokens == 0 (llama.cpp's n_predict 0) only the prompt runs, to warm the cache.
        """
        started = time.perf_counter()
        prompt = torch.tensor(seq.request.prompt_ids, device=self.model.device)
        n_cached, entry = self.prefix_cache.lookup(prompt) if seq.request.cache_prompt else (0, None)
        n_use = min(n_cached, len(prompt) - 1)  # at least one token must run to give logits
        if entry is not None and n_use > 0:
            self.slab.k[:, row, :n_use] = entry.k[:, :n_use]
            self.slab.v[:, row, :n_use] = entry.v[:, :n_use]
        self.slab.lengths[row] = n_use
        view = self.slab.rows(row, row + 1)
        for start in range(n_use, len(prompt), PREFILL_CHUNK):
            logits = self.model(prompt[None, start : start + PREFILL_CHUNK], cache=view)
        seq.cached_tokens = n_use
        seq.prompt_ms = (time.perf_counter() - started) * 1000
        if seq.request.sampling.repetition_penalty != 1.0:
            seq.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.model.device)
            seq.seen[0, prompt] = True
        if seq.request.max_new_tokens == 0:  # a cache warm-up: the prompt's KV is all it wanted
            seq.finish_reason = "length"
            return
        self._sample(seq, logits[:, -1])

    def _step(self) -> None:
        for seq in self.active:
            if seq.request.cancelled.is_set() and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
        if any(seq.finish_reason for seq in self.active):
            return  # retire first, so the batch below holds live rows only
        ids = torch.tensor([seq.next_token for seq in self.active], device=self.model.device)
        logits = decode_one(self.model, ids, self.slab.rows(0, len(self.active)))
        for row, seq in enumerate(self.active):
            self._sample(seq, logits[row : row + 1])

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample and accept one row's next token; a failure ends that row alone, not the batch."""
        try:
            healing = seq.required is not None and not seq.required.done
            if healing:
                logits = seq.required.mask(logits)
            token = int(seq.sampler(logits, seq.seen)[0])
            if healing:
                seq.required.advance(token)
        except Exception:
            log.exception("sampling failed for one request")
            seq.finish_reason = "error"
            return
        self._accept(seq, token)

    def _accept(self, seq: Sequence, token: int) -> None:
        """Take one sampled token: stream its text, or decide that the sequence is done."""
        now = time.perf_counter()
        seq.first_token_at = seq.first_token_at or now
        seq.tokens.append(token)
        seq.n_sampled += 1
        request = seq.request
        if token in request.stop_ids:
            seq.finish_reason = "eos"
            return
        delta = seq.assembler.push(token)
        if delta:
            self._emit(seq.sink, TextDelta(delta))
        if seq.assembler.done:
            seq.finish_reason = "stop"
        elif seq.n_sampled >= request.max_new_tokens:
            seq.finish_reason = "length"
        elif (
            request.max_predict_ms is not None
            and (now - seq.first_token_at) * 1000 > request.max_predict_ms
            and "\n" in seq.assembler.text
        ):
            seq.finish_reason = "time"
        else:
            seq.next_token = token
            if seq.seen is not None:
                seq.seen[0, token] = True

    def _retire(self) -> None:
        """Finish the sequences that are done: report, keep their KV, and pack the rows again."""
        for row in reversed(range(len(self.active))):
            seq = self.active[row]
            if seq.finish_reason is None:
                continue
            if not seq.assembler.done:
                delta = seq.assembler.finish(seq.finish_reason)
                if delta:
                    self._emit(seq.sink, TextDelta(delta))
            self._remember(seq, row)
            self._emit(seq.sink, Finished(self._result(seq)))
            last = len(self.active) - 1
            if row != last:
                n = int(self.slab.lengths[last])
                self.slab.k[:, row, :n] = self.slab.k[:, last, :n]
                self.slab.v[:, row, :n] = self.slab.v[:, last, :n]
                self.slab.lengths[row] = n
                self.active[row] = self.active[last]
            self.active.pop()

    def _fail_active(self) -> None:
        """Report every active sequence as failed and free all rows, touching nothing else."""
        for seq in self.active:
            seq.finish_reason = "error"
            self._emit(seq.sink, Finished(self._result(seq)))
        self.active.clear()

    def _remember(self, seq: Sequence, row: int) -> None:
        n = int(self.slab.lengths[row])
        if seq.request.cache_prompt and n > 0:
            tokens = torch.tensor(seq.tokens[:n], device=self.model.device)
            self.prefix_cache.insert(tokens, self.slab.k[:, row, :n], self.slab.v[:, row, :n])

    def _result(self, seq: Sequence) -> GenerationResult:
        end = time.perf_counter()
        first = seq.first_token_at or end
        return GenerationResult(
            text=seq.assembler.text,
            finish_reason=seq.finish_reason or "stop",
            prompt_tokens=len(seq.request.prompt_ids),
            completion_tokens=seq.n_sampled,
            cached_tokens=seq.cached_tokens,
            prompt_ms=seq.prompt_ms,
            predicted_ms=(end - first) * 1000,
            ttft_ms=(first - seq.submitted_at) * 1000,
            stopping_word=seq.assembler.stopping_word,
        )

    @staticmethod
    def _emit(sink: EventSink, event: Event) -> None:
        try:
            sink(event)
        except Exception:  # a client that went away must not stop the engine
            log.debug("dropping an event for a closed request", exc_info=True)
