"""Prometheus metrics for the server (one registry per server, so tests can run several), under
miaotui's names and, for the dashboards people already run, under vLLM's (`vllm:*`, labelled with
`model_name`).

Not for the engine's own counters (LLMEngine.stats), which the gauges read at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Both:
    """One observation recorded in miaotui's metric and in its vLLM-named twin."""

    def __init__(self, ours, theirs) -> None:
        self.ours, self.theirs = ours, theirs

    def observe(self, value: float) -> None:
        self.ours.observe(value)
        self.theirs.observe(value)

    def inc(self, value: float = 1.0) -> None:
        self.ours.inc(value)
        self.theirs.inc(value)


class ServerMetrics:
    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model_name = model_name

        def vllm(kind, name: str, doc: str, **kw):
            return kind(f"vllm:{name}", doc, ["model_name"], registry=r, **kw).labels(model_name)

        self.requests = Counter("miaotui_requests", "Finished requests by outcome", ["status"], registry=r)
        self.vllm_success = Counter("vllm:request_success", "Finished requests by reason", ["model_name",
                                    "finished_reason"], registry=r)
        self.prompt_tokens = _Both(Counter("miaotui_prompt_tokens", "Prompt tokens processed", registry=r),
                                   vllm(Counter, "prompt_tokens", "Prompt tokens processed"))
        self.generation_tokens = _Both(Counter("miaotui_generation_tokens", "Tokens generated", registry=r),
                                       vllm(Counter, "generation_tokens", "Tokens generated"))
        self.ttft = _Both(Histogram("miaotui_time_to_first_token_seconds", "Time to first token", registry=r,
                                    buckets=_LATENCY_BUCKETS),
                          vllm(Histogram, "time_to_first_token_seconds", "Time to first token",
                               buckets=_LATENCY_BUCKETS))
        self.itl = _Both(Histogram("miaotui_inter_token_latency_seconds", "Time between output tokens", registry=r,
                                   buckets=_LATENCY_BUCKETS),
                         vllm(Histogram, "time_per_output_token_seconds", "Time between output tokens",
                              buckets=_LATENCY_BUCKETS))
        self.e2e = _Both(Histogram("miaotui_request_latency_seconds", "End-to-end request latency", registry=r,
                                   buckets=_LATENCY_BUCKETS),
                         vllm(Histogram, "e2e_request_latency_seconds", "End-to-end request latency",
                              buckets=_LATENCY_BUCKETS))
        self.gauges = {
            "waiting": ("miaotui_num_requests_waiting", "num_requests_waiting", "Requests queued, not yet running"),
            "running": ("miaotui_num_requests_running", "num_requests_running", "Requests in the running batch"),
            "kv_usage": ("miaotui_kv_cache_usage_ratio", "kv_cache_usage_perc", "Share of KV-cache blocks in use"),
            "prefix_hits": ("miaotui_prefix_cache_hit_tokens", "prefix_cache_hits",
                            "Prompt tokens served from the prefix cache"),
            "preemptions": ("miaotui_preemptions", "num_preemptions", "Requests preempted (recomputed) so far"),
            "spec_drafted": ("miaotui_spec_decode_draft_tokens", "spec_decode_num_draft_tokens",
                             "Tokens drafted by speculation so far"),
            "spec_accepted": ("miaotui_spec_decode_accepted_tokens", "spec_decode_num_accepted_tokens",
                              "Drafted tokens the target accepted"),
        }
        self._gauges = {key: (Gauge(ours, doc, registry=r), vllm(Gauge, theirs, doc))
                        for key, (ours, theirs, doc) in self.gauges.items()}

    def finished(self, status: str, reason: str | None = None) -> None:
        self.requests.labels(status).inc()
        if reason is not None:
            self.vllm_success.labels(self.model_name, reason).inc()

    def bind_engine(self, engine) -> None:
        read = {"waiting": lambda: engine.num_waiting, "running": lambda: len(engine.running),
                "kv_usage": lambda: engine.blocks.usage, "prefix_hits": lambda: engine.blocks.prefix_hits,
                "preemptions": lambda: engine.stats.preemptions, "spec_drafted": lambda: engine.stats.spec_drafted,
                "spec_accepted": lambda: engine.stats.spec_accepted}
        for key, gauges in self._gauges.items():
            for gauge in gauges:
                gauge.set_function(read[key])
