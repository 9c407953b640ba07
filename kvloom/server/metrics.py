"""Prometheus metrics of the server, in a registry of its own (one per app).

Every figure is exported twice: under kvloom's names and under vLLM's (`vllm:...`, label
`model_name`), so a Grafana board built for vLLM works against kvloom unchanged. Totals the
engine keeps (preemptions, prefix-cache lookups, draft tokens) become Prometheus Counters, fed
with the increase since the previous step, so `rate()` works on them.

`snapshot()` gives the same figures as JSON for the web dashboard, with latency percentiles over
a recent window (the histograms only know their buckets).
"""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
WINDOW_SECONDS = 60.0          # latency percentiles of the dashboard cover the last minute
_WINDOW_MAX = 10_000           # samples kept per latency window at most


class _Tee:
    """One `inc` feeding kvloom's counter and vLLM's (callers keep using `metrics.prompt_tokens.inc`)."""

    def __init__(self, *counters):
        self.counters = counters

    def inc(self, amount: float = 1) -> None:
        for c in self.counters:
            c.inc(amount)


class _Window:
    """(time, value) samples of the last WINDOW_SECONDS; percentiles for the dashboard."""

    def __init__(self):
        self.samples: deque[tuple[float, float]] = deque(maxlen=_WINDOW_MAX)
        self.lock = threading.Lock()

    def add(self, value: float, now: float | None = None) -> None:
        with self.lock:
            self.samples.append((time.time() if now is None else now, value))

    def summary(self, now: float) -> dict:
        with self.lock:
            while self.samples and self.samples[0][0] < now - WINDOW_SECONDS:
                self.samples.popleft()
            values = sorted(v for _, v in self.samples)
        if not values:
            return {"count": 0, "p50": None, "p90": None, "p99": None}

        def pct(q):
            return values[min(len(values) - 1, int(q * len(values)))]
        return {"count": len(values), "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99)}


class ServerMetrics:
    def __init__(self, model_name: str = "kvloom"):
        r = self.registry = CollectorRegistry()
        # ---- kvloom's names ----
        self.requests = Counter("kvloom_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.kvloom_prompt_tokens = Counter("kvloom_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
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
        self.preemptions = Counter("kvloom_num_preemptions", "Preemptions since start", registry=r)
        self.prefix_queries = Counter("kvloom_prefix_cache_queries", "Tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("kvloom_prefix_cache_hits", "Tokens found in the prefix cache", registry=r)
        self.prefix_hit_rate = Gauge("kvloom_prefix_cache_hit_rate", "Prefix cache hits / queries since start",
                                     registry=r)
        self.sessions = Gauge("kvloom_sessions_retained", "Agent sessions holding KV between calls", registry=r)
        self.session_blocks = Gauge("kvloom_session_kv_blocks", "KV blocks held by idle sessions", registry=r)
        self.spec_proposed = Counter("kvloom_spec_draft_tokens", "Draft tokens scored by the model", registry=r)
        self.spec_accepted = Counter("kvloom_spec_accepted_tokens", "Draft tokens accepted", registry=r)
        self.spec_acceptance = Gauge("kvloom_spec_acceptance_rate", "Accepted / scored draft tokens since start",
                                     registry=r)
        self.spec_mean_accepted = Gauge("kvloom_spec_mean_accepted_length",
                                        "Draft tokens accepted per verification", registry=r)
        # ---- vLLM's names (label model_name), the subset a vLLM Grafana board reads ----
        lab = ["model_name"]
        self._vllm = {
            "running": Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", lab,
                             registry=r),
            "waiting": Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lab,
                             registry=r),
            "kv_usage": Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lab,
                              registry=r),
            "prompt_tokens": Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lab, registry=r),
            "generation_tokens": Counter("vllm:generation_tokens", "Number of generation tokens processed.", lab,
                                         registry=r),
            "preemptions": Counter("vllm:num_preemptions", "Cumulative number of preemptions.", lab, registry=r),
            "prefix_queries": Counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", lab,
                                      registry=r),
            "prefix_hits": Counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", lab, registry=r),
            "spec_draft": Counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", lab, registry=r),
            "spec_accepted": Counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", lab,
                                     registry=r),
            "ttft": Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              lab, buckets=_LATENCY_BUCKETS, registry=r),
            "itl": Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             lab, buckets=_TPOT_BUCKETS, registry=r),
            "tpot": Histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.", lab, buckets=_TPOT_BUCKETS,
                              registry=r),
            "e2e": Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             lab, buckets=_LATENCY_BUCKETS, registry=r),
            "queue_time": Histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", lab,
                                    buckets=_LATENCY_BUCKETS, registry=r),
        }
        self.set_model_name(model_name)
        self._totals = {"preemptions": 0, "prefix_queries": 0, "prefix_hits": 0, "spec_draft": 0,
                        "spec_accepted": 0, "generation": 0}
        self._last_token_time: dict[str, float] = {}     # request id -> time of its latest token (ITL)
        self._steps = 0
        self._windows = {"ttft": _Window(), "tpot": _Window(), "e2e": _Window(), "queue_time": _Window()}
        self._state: dict = {}                           # latest engine figures, for snapshot()
        self.started = time.time()

    def set_model_name(self, name: str) -> None:
        """The `model_name` label of the vLLM-named series (the served model name)."""
        self.model_name = name
        for m in self._vllm.values():
            m.clear()
        self.v = {k: m.labels(model_name=name) for k, m in self._vllm.items()}
        self.prompt_tokens = _Tee(self.kvloom_prompt_tokens, self.v["prompt_tokens"])

    def _count(self, key: str, total: int, *counters) -> None:
        """Feed counters with the increase of an engine total since the previous step."""
        delta = total - self._totals[key]
        self._totals[key] = total
        if delta > 0:
            for c in counters:
                c.inc(delta)

    def observe_engine(self, engine, outputs) -> None:
        """Called by the loop thread after each step."""
        now = time.time()
        s, v = engine.scheduler, self.v
        running, waiting = len(s.running), len(s.waiting)
        usage = engine.pool.num_used / engine.pool.num_blocks
        self.running.set(running)
        self.waiting.set(waiting)
        v["running"].set(running)
        v["waiting"].set(waiting)
        self.kv_blocks_used.set(engine.pool.num_used)
        self.kv_usage.set(usage)
        v["kv_usage"].set(usage)
        self._count("preemptions", s.num_preemptions, self.preemptions, v["preemptions"])
        pc = engine.prefix_cache
        if pc is not None:
            self._count("prefix_queries", pc.queries, self.prefix_queries, v["prefix_queries"])
            self._count("prefix_hits", pc.hits, self.prefix_hits, v["prefix_hits"])
            self.prefix_hit_rate.set(pc.hit_rate)
        self.sessions.set(len(engine.sessions))
        st = None
        if engine.speculator is not None:
            st = engine.speculator.stats()
            self._count("spec_draft", st["proposed"], self.spec_proposed, v["spec_draft"])
            self._count("spec_accepted", st["accepted"], self.spec_accepted, v["spec_accepted"])
            self.spec_acceptance.set(st["acceptance_rate"])
            self.spec_mean_accepted.set(st["mean_accepted_length"])
        self.session_blocks.set(engine.sessions.num_blocks_held)
        generated = sum(len(o.delta_token_ids) for o in outputs)
        self.generation_tokens.inc(generated)
        v["generation_tokens"].inc(generated)
        for o in outputs:
            m = o.metrics
            if len(o.token_ids) == len(o.delta_token_ids) and m.get("first_scheduled_time"):
                q = max(0.0, m["first_scheduled_time"] - m["arrival_time"])
                self.queue_time.observe(q)
                v["queue_time"].observe(q)
                self._windows["queue_time"].add(q, now)
            if o.delta_token_ids:
                last = self._last_token_time.get(o.request_id)
                if last is not None:
                    v["itl"].observe(now - last)
                self._last_token_time[o.request_id] = now
            if o.finished:
                self._last_token_time.pop(o.request_id, None)
        self._steps += 1
        if self._steps % 1000 == 0:      # requests aborted without a final output
            self._last_token_time = {k: t for k, t in self._last_token_time.items() if t > now - 300}
        self._state = {
            "running": running, "waiting": waiting, "kv_cache_usage": usage,
            "kv_cache_blocks_used": engine.pool.num_used, "kv_cache_blocks_total": engine.pool.num_blocks,
            "sessions_retained": len(engine.sessions), "prefix_cache_enabled": pc is not None,
            "speculation_enabled": st is not None,
            "spec_mean_accepted_length": st["mean_accepted_length"] if st else None,
            "updated": now,
        }

    def observe_cluster(self, instances: list[dict]) -> None:
        """Under a cluster the engines run in the actors: the server-wide series (kvloom's and vLLM's names)
        are the sums of the instances' figures (their snapshot()s), taken at scrape time."""
        v = self.v
        live = [i for i in instances if "running" in i]
        running, waiting = sum(i["running"] for i in live), sum(i["waiting"] for i in live)
        used, total = sum(i["kv_cache_blocks_used"] for i in live), sum(i["kv_cache_blocks_total"] for i in live)
        for g, x in ((self.running, running), (v["running"], running), (self.waiting, waiting),
                     (v["waiting"], waiting), (self.kv_blocks_used, used)):
            g.set(x)
        self.kv_usage.set(used / total if total else 0.0)
        v["kv_usage"].set(used / total if total else 0.0)
        sums = lambda key: sum(i.get(key, 0) for i in live)   # noqa: E731
        self._count("generation", sums("generation_tokens_total"), self.generation_tokens, v["generation_tokens"])
        self._count("preemptions", sums("preemptions_total"), self.preemptions, v["preemptions"])
        self._count("prefix_queries", sums("prefix_cache_queries_total"), self.prefix_queries, v["prefix_queries"])
        self._count("prefix_hits", sums("prefix_cache_hits_total"), self.prefix_hits, v["prefix_hits"])
        self._count("spec_draft", sums("spec_draft_tokens_total"), self.spec_proposed, v["spec_draft"])
        self._count("spec_accepted", sums("spec_accepted_tokens_total"), self.spec_accepted, v["spec_accepted"])

    def observe_finished(self, outcome: str, arrival: float, first_token: float | None, end: float,
                         num_tokens: int) -> None:
        v = self.v
        self.requests.labels(outcome=outcome).inc()
        self.e2e.observe(end - arrival)
        v["e2e"].observe(end - arrival)
        self._windows["e2e"].add(end - arrival, end)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            v["ttft"].observe(first_token - arrival)
            self._windows["ttft"].add(first_token - arrival, end)
            if num_tokens > 1:
                tpot = (end - first_token) / (num_tokens - 1)
                self.tpot.observe(tpot)
                v["tpot"].observe(tpot)
                self._windows["tpot"].add(tpot, end)

    def snapshot(self, instance_id: str = "0") -> dict:
        """One instance's figures for the dashboard: gauges now, counters as totals, latency percentiles."""
        now = time.time()
        outcomes = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    outcomes[sample.labels["outcome"]] = int(sample.value)
        return {
            "id": instance_id, "model": self.model_name, "uptime_seconds": now - self.started,
            **self._state,
            "prompt_tokens_total": int(self.kvloom_prompt_tokens._value.get()),
            "generation_tokens_total": int(self.generation_tokens._value.get()),
            "preemptions_total": self._totals["preemptions"],
            "prefix_cache_queries_total": self._totals["prefix_queries"],
            "prefix_cache_hits_total": self._totals["prefix_hits"],
            "spec_draft_tokens_total": self._totals["spec_draft"],
            "spec_accepted_tokens_total": self._totals["spec_accepted"],
            "requests_total": outcomes,
            "latency_window_seconds": WINDOW_SECONDS,
            "latency": {k: w.summary(now) for k, w in self._windows.items()},
        }

    def render(self) -> bytes:
        return generate_latest(self.registry)
