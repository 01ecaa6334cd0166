"""Between the engine thread and asyncio: submit requests, receive their events as an async stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from midfill.engine.request import Finished, GenerationRequest, GenerationResult, TextDelta
from midfill.engine.scheduler import Engine
from midfill.errors import MidfillError
from midfill.server.metrics import Metrics

DISCONNECT_POLL_S = 0.05
ENGINE_FAILED = "generation failed inside the engine"
MAX_GENERATIONS_PER_CALL = 16  # prompts x n in one HTTP request: more would crowd out every other client


class ClientGone(Exception):
    """The client disconnected before its results were ready; its generations were cancelled."""


class EngineCall:
    """One HTTP request's generations (several for n > 1 or a list of prompts), as one event stream.

    Leaving `events()` early (a client that disconnected) cancels whatever is still running; the
    engine notices before its next decode step.
    """

    def __init__(self, engine: Engine, metrics: Metrics, route: str, requests: Sequence[GenerationRequest]) -> None:
        self.engine = engine
        self.metrics = metrics
        self.route = route
        self.requests = list(requests)
        if len(self.requests) > MAX_GENERATIONS_PER_CALL:
            raise MidfillError(
                f"this request asks for {len(self.requests)} generations (prompts x n); at most "
                f"{MAX_GENERATIONS_PER_CALL} are allowed in one request"
            )
        self.results: list[GenerationResult | None] = [None] * len(self.requests)
        self._queue: asyncio.Queue[tuple[int, TextDelta | Finished]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            for index, request in enumerate(self.requests):
                engine.submit(request, self._sink(loop, index))
        except Exception:
            self.cancel()
            raise

    def _sink(self, loop: asyncio.AbstractEventLoop, index: int):
        def sink(event: TextDelta | Finished) -> None:
            if isinstance(event, Finished):  # counted here, even if nobody reads the stream any more
                self.metrics.observe_result(self.route, event.result)
            loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))

        return sink

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def events(self) -> AsyncIterator[tuple[int, TextDelta | Finished]]:
        """(index, event) pairs until every generation has finished."""
        pending = len(self.requests)
        try:
            while pending:
                index, event = await self._queue.get()
                if isinstance(event, Finished):
                    self.results[index] = event.result
                    pending -= 1
                yield index, event
        finally:
            if pending:
                self.cancel()

    async def results_unless_disconnected(self, http: Request) -> list[GenerationResult] | None:
        """Wait for all results; None (and everything cancelled) if the client goes away first."""
        collect = asyncio.ensure_future(self._drain())
        try:
            while not collect.done():
                if await http.is_disconnected():
                    self.cancel()
                    await collect
                    return None
                await asyncio.wait([collect], timeout=DISCONNECT_POLL_S)
            return collect.result()
        finally:
            if not collect.done():
                self.cancel()
                collect.cancel()

    async def finished(self, http: Request) -> list[GenerationResult]:
        """All results, in request order; ClientGone if the client left, RuntimeError if the engine failed."""
        results = await self.results_unless_disconnected(http)
        if results is None:
            raise ClientGone()
        if any(r.finish_reason == "error" for r in results):
            raise RuntimeError(ENGINE_FAILED)
        return results

    async def _drain(self) -> list[GenerationResult]:
        async for _ in self.events():
            pass
        return [r for r in self.results if r is not None]


def sse_event(data: dict | str) -> str:
    """One server-sent event carrying JSON (or a bare marker such as [DONE])."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events from an EngineCall; however the response ends (done, client gone,
    error), whatever is still generating is cancelled."""

    def __init__(self, call: EngineCall, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.cancel()


@dataclass
class StreamFormat:
    """How one protocol writes a stream: events before any text, per text delta, per finished
    generation, for a generation that failed, and after all of them. A callback returning None
    sends nothing."""

    delta: Callable[[int, str], dict | None]
    finished: Callable[[int, GenerationResult], dict]
    failed: dict  # the protocol's own error body
    head: list[dict] = field(default_factory=list)
    tail: Callable[[list[GenerationResult]], list[dict | str]] = lambda results: []


def stream_response(call: EngineCall, fmt: StreamFormat) -> EventStream:
    """The one streaming loop of every protocol: an engine failure is the protocol's error event,
    never a normal finish."""

    async def events() -> AsyncIterator[str]:
        for event in fmt.head:
            yield sse_event(event)
        async for index, event in call.events():
            if isinstance(event, Finished):
                data = fmt.failed if event.result.finish_reason == "error" else fmt.finished(index, event.result)
            else:
                data = fmt.delta(index, event.text)
            if data is not None:
                yield sse_event(data)
        for data in fmt.tail([r for r in call.results if r is not None]):
            yield sse_event(data)

    return EventStream(call, events())


def finish_reason(result: GenerationResult) -> str:
    """OpenAI's (and Refact's) finish_reason: "length" when a limit cut the answer, else "stop"."""
    return "length" if result.finish_reason in ("length", "time") else "stop"
