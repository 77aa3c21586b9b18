"""Prometheus metrics for the server (one registry per server, so tests can run several).

Not for the engine's own counters (LLMEngine.stats), which the gauges read at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("miaotui_requests", "Finished requests by outcome", ["status"], registry=r)
        self.prompt_tokens = Counter("miaotui_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("miaotui_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("miaotui_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("miaotui_inter_token_latency_seconds", "Time between output tokens", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("miaotui_request_latency_seconds", "End-to-end request latency", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.waiting = Gauge("miaotui_num_requests_waiting", "Requests queued, not yet running", registry=r)
        self.running = Gauge("miaotui_num_requests_running", "Requests in the running batch", registry=r)
        self.kv_usage = Gauge("miaotui_kv_cache_usage_ratio", "Share of KV-cache blocks in use", registry=r)
        self.prefix_hits = Gauge("miaotui_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                 registry=r)
        self.preemptions = Gauge("miaotui_preemptions", "Requests preempted (recomputed) so far", registry=r)
        self.spec_drafted = Gauge("miaotui_spec_decode_draft_tokens", "Tokens drafted by speculation so far",
                                  registry=r)
        self.spec_accepted = Gauge("miaotui_spec_decode_accepted_tokens", "Drafted tokens the target accepted",
                                   registry=r)

    def bind_engine(self, engine) -> None:
        self.waiting.set_function(lambda: engine.num_waiting)
        self.running.set_function(lambda: len(engine.running))
        self.kv_usage.set_function(lambda: engine.blocks.usage)
        self.prefix_hits.set_function(lambda: engine.blocks.prefix_hits)
        self.preemptions.set_function(lambda: engine.stats.preemptions)
        self.spec_drafted.set_function(lambda: engine.stats.spec_drafted)
        self.spec_accepted.set_function(lambda: engine.stats.spec_accepted)
