"""The serving engine: one thread that owns the model and serves many requests at once.

Continuous batching: requests join and leave between decode steps. Every active sequence has a
row in one preallocated KV slab; rows stay packed (a finished row is refilled by the last one),
so a decode step is one forward pass over rows 0..B-1. A new request first takes the longest
cached token prefix from the PrefixCache and prefills only the rest. With speculation on, a row
may bring drafted tokens to the same pass (engine/speculate.py); what it does not keep is rolled
back by its length alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from midfill.engine.assembler import TextAssembler
from midfill.engine.prefix_cache import PrefixCache
from midfill.engine.request import Finished, GenerationRequest, GenerationResult
from midfill.engine.sequence import EventSink, Sequence, emit
from midfill.engine.speculate import AcceptancePrior, PassTimes
from midfill.errors import MidfillError
from midfill.model import GPTRefactForCausalLM, KVCache
from midfill.model.decode_step import decode_rows
from midfill.tokenizer import Tokenizer

log = logging.getLogger("midfill.engine")


class EngineUnavailable(Exception):
    """The engine cannot take a request now (stopped, or its queue is full); the client should retry."""


class QueueFull(EngineUnavailable):
    """More requests are waiting than the engine was told to queue."""


@dataclass
class Pending:
    request: GenerationRequest
    sink: EventSink
    submitted_at: float = field(default_factory=time.perf_counter)
    assembler: TextAssembler | None = None  # the caller's own, for `stream_text`


class Engine:
    def __init__(
        self,
        model: GPTRefactForCausalLM,
        tok: Tokenizer | None,
        max_batch: int = 8,
        max_queue: int = 64,
        ctx: int | None = None,
        prefix_cache_mb: float = 256.0,
        speculate: bool = True,
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
        self.speculate = speculate  # requests may opt out one by one (GenerationRequest.speculate)
        self.pass_times = PassTimes()
        self.acceptance = AcceptancePrior()  # where each new request's drafting starts
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

    def submit(self, request: GenerationRequest, sink: EventSink, assembler: TextAssembler | None = None) -> None:
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
            self.pending.append(Pending(request, sink, assembler=assembler))
            self.wakeup.notify()

    def _drop_cancelled_pending(self) -> None:
        """Answer queued requests whose client has gone, so they stop taking room in the queue."""
        if any(item.request.cancelled.is_set() for item in self.pending):
            gone = [item for item in self.pending if item.request.cancelled.is_set()]
            self.pending = deque(item for item in self.pending if not item.request.cancelled.is_set())
            for item in gone:
                emit(item.sink, Finished(GenerationResult.empty(item.request, "cancelled")))

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
                self._iterate(admitted)
        for seq in self.active:
            seq.finish_reason = "cancelled"
        self._retire()
        for item in self.pending:
            emit(item.sink, Finished(GenerationResult.empty(item.request, "cancelled")))

    def drive(self) -> None:
        """Run queued requests to their end in the calling thread (for an engine that was not started)."""
        while self.pending or self.active:
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One turn in the calling thread: admit what fits, decode one token for every row, retire."""
        self._iterate(self._next_admissions())

    def _iterate(self, admitted: list[Pending]) -> None:
        """One turn of the engine: prefill what was admitted (each gets its first token), or else
        take one decode step for every row; then retire what is done."""
        try:
            for item in admitted:
                self._admit(item)
            self._retire()
            if self.active and not admitted:
                try:
                    self._step()
                except Exception:
                    log.exception("decode step failed; failing the batch")
                    for seq in self.active:
                        seq.finish_reason = seq.finish_reason or "error"
                self._retire()
        except Exception:  # a bug must fail the requests it touched, never the thread
            log.exception("engine step failed; failing the batch")
            self._fail_active()

    def _admit(self, item: Pending) -> None:
        try:
            seq = Sequence(item.request, item.sink, self.tok, self.model.device, item.submitted_at, item.assembler,
                           self.acceptance.rate)
        except Exception:
            log.exception("a request could not be admitted")
            emit(item.sink, Finished(GenerationResult.empty(item.request, "error")))
            return
        self.active.append(seq)
        if item.request.cancelled.is_set():
            seq.finish_reason = "cancelled"
            return
        try:
            seq.prefill(self.model, self.slab, len(self.active) - 1, self.prefix_cache)
        except Exception:
            log.exception("prefill failed")
            seq.finish_reason = "error"

    def _step(self) -> None:
        """One decode step for every active row: one forward pass, then each row samples its own token."""
        for seq in self.active:
            if seq.request.cancelled.is_set() and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
        if any(seq.finish_reason for seq in self.active):
            return  # retire first, so the batch below holds live rows only
        drafts: list[list[int]] = []
        for seq in self.active:
            rows = len(self.active) + sum(map(len, drafts))
            drafts.append(seq.draft(rows, self.pass_times) if self.speculate else [])
        tokens = [t for seq, draft in zip(self.active, drafts) for t in (seq.next_token, *draft)]
        rows = [row for row, draft in enumerate(drafts) for _ in range(1 + len(draft))]
        view = self.slab.rows(0, len(self.active))
        started = time.perf_counter()
        logits = decode_rows(self.model, torch.tensor(tokens, device=self.model.device), torch.tensor(rows, device=self.model.device), view)
        self.pass_times.record(len(tokens), time.perf_counter() - started)
        first = 0
        for row, (seq, draft) in enumerate(zip(self.active, drafts)):
            try:
                view.lengths[row] += seq.take(logits[first : first + 1 + len(draft)], draft)
            except Exception:  # ends that row alone
                log.exception("sampling failed for one request")
            first += 1 + len(draft)

    def _retire(self) -> None:
        """Finish the sequences that are done: report, keep their KV, and pack the rows again."""
        for row in reversed(range(len(self.active))):
            seq = self.active[row]
            if seq.finish_reason is None:
                continue
            self._remember(seq, row)
            self.acceptance.learn(seq.policy)
            seq.finish()
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
            seq.emit(Finished(seq.result()))
        self.active.clear()

    def _remember(self, seq: Sequence, row: int) -> None:
        n = int(self.slab.lengths[row])
        if seq.request.cache_prompt and n > 0:
            tokens = torch.tensor(seq.tokens[:n], device=self.model.device)
            self.prefix_cache.insert(tokens, self.slab.k[:, row, :n], self.slab.v[:, row, :n])
