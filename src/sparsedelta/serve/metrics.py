"""Prometheus metrics of a serving engine (GET /metrics): queue depth, running rows, rows per
decoding step, tokens generated (and their rate over the last seconds), requests per model and outcome,
request latency. Each app has its own registry, so two servers in one process never mix counts."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

WINDOW = 10.0  # seconds over which tokens_per_second is averaged


class Metrics:
    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("sparsedelta_requests", "Requests answered, by model (adapter or base) and outcome",
                                ["model", "outcome"], registry=registry)  # fmt: skip
        self.prompt_tokens = Counter("sparsedelta_prompt_tokens", "Prompt tokens of answered requests", ["model"], registry=registry)
        self.generated = Counter("sparsedelta_generated_tokens", "Tokens generated", registry=registry)
        self.batch_rows = Histogram("sparsedelta_batch_rows", "Rows decoded together in one step", registry=registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))  # fmt: skip
        self.latency = Histogram("sparsedelta_request_seconds", "Time from arrival to the last token", ["model"], registry=registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))  # fmt: skip
        Gauge("sparsedelta_queue_depth", "Requests waiting for a place in the batch", registry=registry).set_function(engine.queue.qsize)
        Gauge("sparsedelta_running_rows", "Rows in the running batch", registry=registry).set_function(lambda: engine.stats["rows"])
        Gauge("sparsedelta_adapters", "Adapters served", registry=registry).set_function(lambda: len(engine.adapters))
        Gauge("sparsedelta_tokens_per_second", f"Tokens generated per second over the last {WINDOW:g} s",
              registry=registry).set_function(self.tokens_per_second)  # fmt: skip
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        engine.metrics = self

    def step(self, rows: int, tokens: int) -> None:
        """One decoding step (called by the engine's worker)."""
        self.batch_rows.observe(rows)
        self.generated.inc(tokens)
        with self._lock:
            self._recent.append((time.monotonic(), tokens))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - WINDOW:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / WINDOW

    def answered(self, model: str, outcome: str, prompt_tokens: int, seconds: float) -> None:
        self.requests.labels(model, outcome).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.latency.labels(model).observe(seconds)
