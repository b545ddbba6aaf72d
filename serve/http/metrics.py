"""Prometheus metrics of one server (its own registry, so several apps in one process, as in tests or Ray, do not
collide). Exposed at GET /metrics in the text format.
"""

from __future__ import annotations

from typing import Any

PREFIX = "tuneforge"
# Seconds: from a 1 ms classifier call to a long generation.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's counters, histograms and gauges (labels: model, route, status)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered, by model, route and status code",
                                ["model", "route", "status"], registry=r)
        self.errors = Counter(f"{PREFIX}_request_errors", "HTTP requests answered with a 4xx or 5xx status",
                              ["model", "route", "status"], registry=r)
        self.latency = Histogram(f"{PREFIX}_request_seconds", "time from request to the end of the response (a "
                                 "stream: its last chunk)", ["model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "inputs per model run of the classifiers' micro-batcher",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.inputs = Counter(f"{PREFIX}_inputs", "texts or images classified", ["model"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of generation requests", ["model"],
                                     registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "tokens generated", ["model"], registry=r)
        self.first_token = Histogram(f"{PREFIX}_time_to_first_token_seconds", "time from admission to the first "
                                     "generated token", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.cancelled = Counter(f"{PREFIX}_generations_cancelled", "generations stopped because the client went "
                                 "away", ["model"], registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "requests admitted and not yet running (generation: "
                                 "waiting for a slot; classifiers: waiting for their batch)", ["model"], registry=r)
        self.running = Gauge(f"{PREFIX}_running", "requests running now (generation: decoding)", ["model"],
                             registry=r)
        self.rejected = Counter(f"{PREFIX}_rejected", "requests refused with 503 because the queue was full",
                                ["model"], registry=r)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe_request(self, model: str, route: str, status: int, seconds: float) -> None:
        labels: dict[str, Any] = {"model": model, "route": route, "status": str(status)}
        self.requests.labels(**labels).inc()
        if status >= 400:
            self.errors.labels(**labels).inc()
        self.latency.labels(model=model, route=route).observe(seconds)
