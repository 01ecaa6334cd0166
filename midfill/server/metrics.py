"""Prometheus metrics, kept in a registry of the app's own (so several apps can live in one process)."""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from midfill.engine.request import GenerationResult

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


RECENT = 50


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("midfill_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.ttft = Histogram("midfill_time_to_first_token_seconds", "Submission to first generated token",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("midfill_request_duration_seconds", "Whole request, as the client sees it",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("midfill_prompt_tokens", "Prompt tokens received", registry=r)
        self.completion_tokens = Counter("midfill_completion_tokens", "Tokens generated", registry=r)
        self.drafted = Counter("midfill_draft_tokens", "Prompt-lookup tokens verified (speculative decoding)", registry=r)
        self.accepted = Counter("midfill_draft_accepted_tokens", "Drafted tokens the model agreed with and kept", registry=r)
        self.cache_hit_tokens = Counter("midfill_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", registry=r)
        self.cancelled = Counter("midfill_cancelled_requests", "Generations stopped early: disconnect or newer request on the slot", registry=r)
        self.queue_depth = Gauge("midfill_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.active = Gauge("midfill_active_sequences", "Sequences in the running batch", registry=r)
        self.recent: deque[GenerationResult] = deque(maxlen=RECENT)  # for the status page's rolling numbers
        self.generated = 0

    def observe_result(self, route: str, result: GenerationResult) -> None:
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(result.completion_tokens)
        self.cache_hit_tokens.inc(result.cached_tokens)
        self.drafted.inc(result.drafted_tokens)
        self.accepted.inc(result.accepted_tokens)
        if result.finish_reason == "cancelled":
            self.cancelled.inc()
        if result.completion_tokens:
            self.ttft.labels(route).observe(result.ttft_ms / 1000)
        self.recent.append(result)
        self.generated += result.completion_tokens

    def summary(self) -> dict:
        """Numbers over the last RECENT generations: decode speed, time to first token, prefix-cache hits."""
        done = [r for r in self.recent if r.completion_tokens]
        decode_s = sum(r.predicted_ms for r in done) / 1000
        prompt = sum(r.prompt_tokens for r in self.recent)
        return {
            "generations": len(self.recent),
            "tokens_per_s": sum(r.completion_tokens for r in done) / decode_s if decode_s > 0 else None,
            "ttft_ms": sum(r.ttft_ms for r in done) / len(done) if done else None,
            "prefix_cache_hit_rate": sum(r.cached_tokens for r in self.recent) / prompt if prompt else None,
            "completion_tokens_total": self.generated,
            "drafted_tokens": sum(r.drafted_tokens for r in self.recent),
            "accepted_tokens": sum(r.accepted_tokens for r in self.recent),
        }

    def render(self) -> bytes:
        return generate_latest(self.registry)
