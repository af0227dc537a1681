"""Prometheus metrics with vLLM's names under a `tandem:` prefix, one registry per app.

Engine-side numbers (queue sizes, KV usage, token and prefix-cache counters) are read from the
engine's stats at scrape time; latencies and finished requests are observed here, as outputs
arrive (the client calls the RequestMetrics hooks)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem.shared.wire.messages import StatsMsg

# vLLM's buckets.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]


class EngineStatsCollector:
    """Exports the latest StatsMsg (set by the /metrics handler just before a scrape)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: StatsMsg | None = None

    def describe(self):
        return []

    def collect(self):
        s = self.stats
        if s is None:
            return
        labels = ["model_name"]
        gauges = [
            ("tandem:num_requests_running", "Requests in the running batch.", s.num_running),
            ("tandem:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("tandem:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", s.kv_cache_usage),
            ("tandem:kv_cache_used_blocks", "KV-cache blocks held by requests.", s.num_used_blocks),
            ("tandem:kv_cache_total_blocks", "KV-cache blocks in the pool.", s.num_total_blocks),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            yield g
        counters = [
            ("tandem:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("tandem:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            ("tandem:prompt_tokens", "Prompt tokens admitted.", s.prompt_tokens),
            ("tandem:generation_tokens", "Tokens generated.", s.generation_tokens),
            ("tandem:num_preemptions", "Requests preempted (recomputed later).", s.num_preemptions),
        ]
        for name, doc, value in counters:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model_name], value)
            yield c


class ServerMetrics:
    """Implements the engine client's RequestMetrics hooks."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.engine = EngineStatsCollector(model_name)
        self.registry.register(self.engine)
        labels = ["model_name"]
        self.ttft = Histogram("tandem:time_to_first_token_seconds", "Time to the first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("tandem:inter_token_latency_seconds", "Time between output tokens.", labels,
                             buckets=_ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("tandem:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=_E2E_BUCKETS, registry=self.registry).labels(model_name)
        self.success = Counter("tandem:request_success", "Finished choices by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_next_token(self, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def on_finished(self, finish_reasons: list[str], e2e_s: float) -> None:
        self.e2e.observe(e2e_s)
        for reason in finish_reasons:
            self.success.labels(self.model_name, reason).inc()
