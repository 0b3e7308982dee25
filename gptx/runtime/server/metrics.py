"""Prometheus metrics for one server: its own registry, so several apps can live in one process (tests, Ray)."""

from __future__ import annotations

from functools import partial

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int):
        self.registry = r = CollectorRegistry()
        counter, gauge = partial(Counter, registry=r), partial(Gauge, registry=r)
        histogram = partial(Histogram, buckets=LATENCY_BUCKETS, registry=r)
        self.http_requests = counter("gptx_http_requests", "HTTP responses by route and status code",
                                     ["endpoint", "status"])
        self.completions = counter("gptx_completions", "Generations by finish reason (one per prompt)",
                                   ["finish_reason"])
        self.prompt_tokens = counter("gptx_prompt_tokens", "Prompt tokens of accepted requests")
        self.completion_tokens = counter("gptx_completion_tokens", "Tokens generated")
        self.cached_prompt_tokens = counter("gptx_prompt_tokens_cached",
                                            "Prompt tokens served from the prefix cache instead of computed")
        self.queue_waiting = gauge("gptx_queue_waiting", "Requests waiting for a row")
        self.active_rows = gauge("gptx_active_rows", "Rows of the batch in use")
        gauge("gptx_max_batch", "Rows of the batch").set(max_batch)
        batch_buckets = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, max_batch})
        self.batch_size = histogram("gptx_step_batch_size", "Rows per graph call", ["kind"], buckets=batch_buckets)
        self.step_seconds = histogram("gptx_step_seconds", "Duration of each graph call", ["kind"])
        self.ttft = histogram("gptx_time_to_first_token_seconds", "Request arrival to its first token")
        self.itl = histogram("gptx_inter_token_latency_seconds", "Between consecutive tokens of one request")
        self.request_seconds = histogram("gptx_request_seconds", "Whole request", ["endpoint"], buckets=REQUEST_BUCKETS)

    def on_step(self, kind: str, seconds: float, batch: int) -> None:
        """The pool's hook, called in its worker thread after every graph call (prometheus-client is thread-safe)."""
        self.batch_size.labels(kind).observe(batch)
        self.step_seconds.labels(kind).observe(seconds)

    def render(self, stats) -> bytes:
        """The text exposition, with the pool's gauges read now (stats: the pool's SchedulerStats, or None)."""
        self.queue_waiting.set(stats.waiting if stats else 0)
        self.active_rows.set(stats.active if stats else 0)
        return generate_latest(self.registry)
