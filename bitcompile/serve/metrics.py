"""The server's Prometheus metrics (prometheus_client), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, scheduler_status):
        """scheduler_status(): the engine scheduler's status dict, read at each scrape."""
        self.registry = CollectorRegistry()
        self.requests = Counter("bitcompile_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("bitcompile_prompt_tokens", "Prompt tokens of served requests",
                                     registry=self.registry)
        self.generated_tokens = Counter("bitcompile_generated_tokens", "Tokens generated for served requests",
                                        registry=self.registry)
        self.ttft = Histogram("bitcompile_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("bitcompile_inter_token_latency_seconds", "Between consecutive generated tokens",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_SchedulerCollector(scheduler_status))

    def finished(self, request):
        """Count a finished engine request's tokens and latencies."""
        self.prompt_tokens.inc(request.prompt_tokens)
        self.generated_tokens.inc(request.completion_tokens)
        if request.ttft_s is not None:
            self.ttft.observe(request.ttft_s)
        for gap in request.inter_token_s:
            self.itl.observe(gap)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerCollector:
    """Queue length, running sequences, KV pages and prefix reuse, read from the scheduler."""

    def __init__(self, status):
        self.status = status

    def collect(self):
        s = self.status()
        gauges = {"queue_length": ("Requests waiting for room in the KV cache", s["waiting"]),
                  "running_sequences": ("Sequences in the running batch", s["running"]),
                  "kv_pages_used": ("KV cache pages in use (running sequences and kept prefixes)", s["kv_pages_used"]),
                  "kv_pages_free": ("KV cache pages free", s["kv_pages_total"] - s["kv_pages_used"]),
                  "kv_prefixes_kept": ("Finished sequences kept as reusable prefixes", s["prefixes_kept"])}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"bitcompile_{name}", doc, value=value)
        yield CounterMetricFamily("bitcompile_prefix_hits", "Requests that forked a cached prefix",
                                  value=s["prefix_hits"])
        yield CounterMetricFamily("bitcompile_prefix_tokens", "Prompt tokens taken from cached prefixes",
                                  value=s["prefix_tokens"])
