"""The serving engine without HTTP: batching equals one-at-a-time, prefix cache, queue, cancellation."""

from __future__ import annotations

import threading

import pytest
import torch

from midfill.engine import TextAssembler, stream_text
from midfill.engine.prefix_cache import PrefixCache, common_prefix_length
from midfill.engine.request import Finished, GenerationRequest, TextDelta
from midfill.engine.scheduler import Engine, QueueFull
from midfill.errors import MidfillError
from tests.helpers import tiny_model


class Collector:
    """Gathers one request's events; `wait()` returns its result."""

    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.result = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, TextDelta):
            self.deltas.append(event.text)
        elif isinstance(event, Finished):
            self.result = event.result
            self.done.set()

    def wait(self):
        assert self.done.wait(30), "the engine did not finish the request"
        return self.result


@pytest.fixture
def engine(small_tokenizer):
    engine = Engine(tiny_model(seed=8), small_tokenizer, max_batch=4, max_queue=32)
    engine.start()
    yield engine
    engine.stop()


def test_batched_rows_of_different_lengths_equal_single_runs(engine, small_tokenizer):
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 8, 40, 1, 25, 12, 9)]
    collectors = [Collector() for _ in prompts]
    for prompt, collector in zip(prompts, collectors):
        engine.submit(GenerationRequest(prompt, 15, stop_ids=frozenset(), cache_prompt=False), collector)
    for prompt, collector in zip(prompts, collectors):
        assembler = TextAssembler(small_tokenizer)
        expected = "".join(stream_text(engine.model, prompt, assembler, 15, stop_ids=[]))
        result = collector.wait()
        assert result.text == expected == "".join(collector.deltas)
        assert result.completion_tokens == 15 and result.finish_reason == "length"


def test_prefix_cache_hit_gives_the_same_tokens(engine):
    prompt = list(range(10, 70))
    first, second = Collector(), Collector()
    engine.submit(GenerationRequest(prompt, 6, stop_ids=frozenset()), first)
    first.wait()
    engine.submit(GenerationRequest(prompt + [3, 4], 6, stop_ids=frozenset()), second)
    assert second.wait().cached_tokens >= len(prompt)
    assembler = TextAssembler(engine.tok)
    assert second.result.text == "".join(stream_text(engine.model, prompt + [3, 4], assembler, 6, stop_ids=[]))


def test_warm_up_request_fills_the_cache_without_generating(engine):
    prompt = list(range(100, 150))
    warm = Collector()
    engine.submit(GenerationRequest(prompt, 0), warm)
    assert warm.wait().completion_tokens == 0 and warm.result.finish_reason == "length"
    follow = Collector()
    engine.submit(GenerationRequest(prompt + [7], 2), follow)
    assert follow.wait().cached_tokens == len(prompt)


def test_cancelled_request_stops_and_reports(engine):
    request = GenerationRequest([5, 6, 7], 200, stop_ids=frozenset())
    collector = Collector()
    request.cancel()
    engine.submit(request, collector)
    assert collector.wait().finish_reason == "cancelled" and collector.result.completion_tokens == 0


def test_prompt_over_context_is_refused(engine):
    with pytest.raises(MidfillError, match="exceed the context of 256"):
        engine.submit(GenerationRequest(list(range(1, 250)), 10), Collector())


def test_full_queue_raises(small_tokenizer):
    engine = Engine(tiny_model(), small_tokenizer, max_batch=1, max_queue=2)  # not started: nothing drains
    engine.submit(GenerationRequest([1, 2], 1), Collector())
    engine.submit(GenerationRequest([1, 2], 1), Collector())
    with pytest.raises(QueueFull):
        engine.submit(GenerationRequest([1, 2], 1), Collector())


def test_common_prefix_length():
    a = torch.tensor([1, 2, 3, 4])
    assert common_prefix_length(a, torch.tensor([1, 2, 9])) == 2
    assert common_prefix_length(a, torch.tensor([1, 2])) == 2
    assert common_prefix_length(a, torch.tensor([7])) == 0


def kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(2, n, 4), torch.zeros(2, n, 4)  # 2 layers, head_dim 4: 64 bytes per token, k+v


def test_prefix_cache_prefers_the_longest_match_and_stays_in_budget():
    cache = PrefixCache(max_bytes=64 * 30 + 200)
    cache.insert(torch.tensor(range(10)), *kv(10))
    cache.insert(torch.tensor([0, 1, 2, 50, 51]), *kv(5))
    n, entry = cache.lookup(torch.tensor([0, 1, 2, 3, 4, 99]))
    assert n == 5 and len(entry.tokens) == 10
    cache.insert(torch.tensor(range(20)), *kv(20))  # supersedes the 10-token entry, evicts by LRU
    assert cache.nbytes <= cache.max_bytes
    assert all(len(e.tokens) != 10 for e in cache.entries.values())
    assert cache.lookup(torch.tensor(range(25)))[0] == 20


def test_prefix_cache_with_zero_budget_keeps_nothing():
    cache = PrefixCache(max_bytes=0)
    cache.insert(torch.tensor([1, 2, 3]), *kv(3))
    assert cache.lookup(torch.tensor([1, 2, 3]))[0] == 0
