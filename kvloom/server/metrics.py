"""Prometheus metrics of the server, in a registry of its own (one per app)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvloom_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("kvloom_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("kvloom_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("kvloom_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kvloom_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("kvloom_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("kvloom_request_queue_time_seconds", "Time from arrival to first scheduling",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("kvloom_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("kvloom_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_blocks_used = Gauge("kvloom_kv_cache_blocks_used", "KV blocks in use", registry=r)
        self.kv_usage = Gauge("kvloom_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.preemptions = Gauge("kvloom_num_preemptions", "Preemptions since start", registry=r)
        self.prefix_queries = Gauge("kvloom_prefix_cache_queries", "Tokens looked up in the prefix cache",
                                    registry=r)
        self.prefix_hits = Gauge("kvloom_prefix_cache_hits", "Tokens found in the prefix cache", registry=r)
        self.prefix_hit_rate = Gauge("kvloom_prefix_cache_hit_rate", "Prefix cache hits / queries", registry=r)
        self.sessions = Gauge("kvloom_sessions_retained", "Agent sessions holding KV between calls", registry=r)
        self.session_blocks = Gauge("kvloom_session_kv_blocks", "KV blocks held by idle sessions", registry=r)
        self.spec_proposed = Gauge("kvloom_spec_draft_tokens", "Draft tokens scored by the model", registry=r)
        self.spec_accepted = Gauge("kvloom_spec_accepted_tokens", "Draft tokens accepted", registry=r)
        self.spec_acceptance = Gauge("kvloom_spec_acceptance_rate", "Accepted / scored draft tokens", registry=r)
        self.spec_mean_accepted = Gauge("kvloom_spec_mean_accepted_length",
                                        "Draft tokens accepted per verification", registry=r)

    def observe_engine(self, engine, outputs) -> None:
        """Called by the loop thread after each step."""
        s = engine.scheduler
        self.running.set(len(s.running))
        self.waiting.set(len(s.waiting))
        self.kv_blocks_used.set(engine.pool.num_used)
        self.kv_usage.set(engine.pool.num_used / engine.pool.num_blocks)
        self.preemptions.set(s.num_preemptions)
        if engine.prefix_cache is not None:
            self.prefix_queries.set(engine.prefix_cache.queries)
            self.prefix_hits.set(engine.prefix_cache.hits)
            self.prefix_hit_rate.set(engine.prefix_cache.hit_rate)
        self.sessions.set(len(engine.sessions))
        if engine.speculator is not None:
            st = engine.speculator.stats()
            self.spec_proposed.set(st["proposed"])
            self.spec_accepted.set(st["accepted"])
            self.spec_acceptance.set(st["acceptance_rate"])
            self.spec_mean_accepted.set(st["mean_accepted_length"])
        self.session_blocks.set(engine.sessions.num_blocks_held)
        self.generation_tokens.inc(sum(len(o.delta_token_ids) for o in outputs))
        for o in outputs:
            m = o.metrics
            if len(o.token_ids) == len(o.delta_token_ids) and m.get("first_scheduled_time"):
                self.queue_time.observe(max(0.0, m["first_scheduled_time"] - m["arrival_time"]))

    def observe_finished(self, outcome: str, arrival: float, first_token: float | None, end: float,
                         num_tokens: int) -> None:
        self.requests.labels(outcome=outcome).inc()
        self.e2e.observe(end - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if num_tokens > 1:
                self.tpot.observe((end - first_token) / (num_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
