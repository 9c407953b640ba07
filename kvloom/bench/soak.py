"""`kvloom bench soak`: a long mixed load against a live server on loopback, then an audit.

Workers send the mix of kvloom/bench/soak_mix.py back to back (streams and not, chat and completions,
n 1-4, logprobs, stop strings, seeds, greedy and sampled, prompts from a few tokens to near the context,
invalid ones, clients that hang up mid-stream or give up early), and every so often a burst of several
times the server's admission queue arrives at once, so some requests get 503 + Retry-After (a worker
that gets one waits that long, give or take half, before its next request).

Afterwards, checked and printed:
- every request is exactly one of finished / rejected (with a reason) / cancelled by its client; lost = 0;
- the server's kvloom_requests_total{outcome} moved consistently with what the clients saw;
- once idle: no request running or waiting and no KV block in use (kvloom_kv_cache_blocks_used counts blocks
  with a reference: free blocks the prefix cache keeps for reuse are not counted; blocks idle agent sessions
  hold are, and are also given as kvloom_session_kv_blocks: the soak opens no sessions, so both must be 0);
- the server's resident memory and threads after the run against after the warm-up, within stated bounds;
- a server the soak started exits 0 on SIGTERM, with no traceback in its log.
Loops are bounded in time (--duration, --warmup) and count (--max-requests); every request in time
(--request-timeout, far above the slowest expected answer, so a hanging stream is lost, not waited for).
"""
from __future__ import annotations

import asyncio
import json
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import httpx
from tqdm import tqdm

from kvloom.bench.soak_client import OUTCOMES, RequestResult, perform
from kvloom.bench.soak_mix import RequestMix, build_pool
from kvloom.bench.soak_server import (MetricsSnapshot, ProcessWatch, ServerProcess, require_loopback, scrape,
                                      tracebacks)

MIB = 2**20


@dataclass
class SoakSettings:
    model: str | None = None            # launched server: the model (None: the built-in default)
    base_url: str | None = None         # instead: a running server on loopback
    server_pid: int | None = None       # ... and its pid, for memory and threads
    api_key: str | None = None
    duration: float = 1200.0
    warmup: float = 30.0
    concurrency: int = 8
    seed: int = 0
    max_waiting_requests: int = 24      # passed to a launched server; read from /server_info otherwise
    serve_args: str = ""                # more `kvloom serve` flags for a launched server
    burst_interval: float = 30.0        # seconds between bursts (+-30%)
    burst_factor: float = 4.0           # a burst is this many times the server's admission queue
    request_timeout: float = 300.0
    max_requests: int = 200_000
    idle_timeout: float = 60.0
    # A model's KV pool is allocated and touched at start, so memory should not grow with traffic: what
    # remains is allocator slack and bounded caches (metrics windows, histograms, tokenizer caches).
    max_rss_growth_mib: float = 128.0
    max_thread_growth: int = 2
    server_log: str | None = None
    progress: bool = True


@dataclass
class _Record:
    phase: str
    result: RequestResult
    n: int
    tags: list[str]


class _Budget:
    def __init__(self, limit: int):
        self.left = limit

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]   # noqa: E731
    return {"count": len(v), "p50": round(pick(0.50), 4), "p99": round(pick(0.99), 4), "max": round(v[-1], 4)}


def check_counters(tally: dict, delta: dict) -> dict:
    """Do the server's outcome counters agree with what the clients saw?

    Exact agreement is not to be had: a client that hangs up may be counted as an abort, as successes (it
    finished before the server noticed), as both (some of its n samples finished), or as rejected (it was
    still queued at the door). And success counts choices today, not requests. So each figure is bounded:
    a finished request adds 1..n, a 503 adds 1 rejected, a cancelled one 1..n of any kind, an invalid one 0.
    """
    F, Fc, C, Cc, R = (tally[k] for k in ("finished", "finished_choices", "cancelled", "cancelled_choices",
                                            "overloaded"))
    L, Lc = tally["lost"], tally["lost_choices"]     # slack so this check stands apart from the lost check
    T = tally.get("throttled", 0)                    # 429s: whether the server counts them is its choice
    S, A, J = (delta.get(k, 0) for k in ("success", "abort", "rejected"))
    other = {k: v for k, v in delta.items() if k not in ("success", "abort", "rejected") and v}
    checks = {
        "rejected": R <= J <= R + T + C + L,
        "abort": A <= C + L,
        "success": F <= S <= Fc + Cc + Lc,
        "every_request_counted": F + R + C <= S + A + J <= Fc + R + T + Cc + Lc,
        "no_other_outcomes": not other,
    }
    return {"ok": all(checks.values()), "checks": checks, "other_outcomes": other,
            "bounds": {"rejected": [R, R + T + C + L], "abort": [0, C + L], "success": [F, Fc + Cc + Lc],
                       "total": [F + R + C, Fc + R + T + Cc + Lc]}}


class _Soak:
    def __init__(self, s: SoakSettings, base: str, pid: int | None):
        self.s, self.base = s, base
        self.watch = ProcessWatch(pid)
        self.records: list[_Record] = []
        self.budget = _Budget(s.max_requests)
        self.server_down = False     # set on a refused connection: sending on would only spin
        self.headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}

    def client(self) -> httpx.AsyncClient:
        # No keep-alive: a kept connection the server closes just as a request goes out is a client-side
        # race, not a server fault; one connection per request also makes every hang-up reach the server.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        return httpx.AsyncClient(timeout=httpx.Timeout(self.s.request_timeout + 30), limits=limits,
                                 headers=self.headers)

    async def _one(self, h, req, phase: str) -> RequestResult:
        res = await perform(h, self.base, req, self.s.request_timeout)
        self.records.append(_Record(phase, res, req.n, req.tags))
        if res.reason.startswith("ConnectError"):
            self.server_down = True
        return res

    async def phase(self, h, name: str, seconds: float, mix_seed: int) -> None:
        """Workers and bursts until `seconds` have passed (or the request budget is spent); then what is in
        flight finishes (each request bounded by its timeout)."""
        s = self.s
        end = time.monotonic() + seconds
        mixes = [RequestMix(self.pool, self.model, random.Random(mix_seed * 1009 + i))
                 for i in range(s.concurrency + 1)]

        async def worker(mix):
            while time.monotonic() < end and not self.server_down and self.budget.take():
                res = await self._one(h, mix.next(), name)
                if res.retry_after is not None:   # as a polite client does, rather than a 503 storm
                    pause = min(res.retry_after, 10) * mix.rng.uniform(0.5, 1.5)
                    await asyncio.sleep(max(0.0, min(pause, end - time.monotonic())))

        async def bursts(mix):
            rng = mix.rng
            # The first burst comes early enough that a short phase (the warm-up) has one too.
            wait = min(s.burst_interval, seconds / 2) * rng.uniform(0.7, 1.3)
            while time.monotonic() + wait < end and not self.server_down:
                await asyncio.sleep(wait)
                reqs = [mix.burst() for _ in range(self.burst_size) if self.budget.take()]
                await asyncio.gather(*(self._one(h, r, name) for r in reqs))
                wait = s.burst_interval * rng.uniform(0.7, 1.3)

        async def ticker():
            with tqdm(total=int(seconds), desc=name, unit="s", disable=not s.progress, leave=False) as bar:
                while time.monotonic() < end:
                    await asyncio.sleep(1)
                    bar.update(1)
                    bar.set_postfix(Counter(r.result.outcome for r in self.records), refresh=False)

        tick = asyncio.create_task(ticker())
        await asyncio.gather(*(worker(m) for m in mixes[:-1]), bursts(mixes[-1]))
        tick.cancel()

    async def wait_idle(self, h) -> dict:
        """Poll /metrics until nothing runs, waits or holds a block and the outcome counters have stopped
        moving (handlers count their requests a moment after the engine lets them go)."""
        t0 = time.monotonic()
        stable_since, last = None, None
        while True:
            try:
                snap = await scrape(h, self.base)
            except httpx.HTTPError as e:
                return {"clean": False, "error": f"{type(e).__name__}: {e}",
                        "waited_s": round(time.monotonic() - t0, 2)}
            now = time.monotonic()
            if snap.idle and snap.outcomes == last:
                stable_since = stable_since or now
                if now - stable_since >= 1.5:
                    return {"clean": True, "waited_s": round(now - t0, 2), **snap.gauges}
            else:
                stable_since = None
            last = snap.outcomes
            if now - t0 > self.s.idle_timeout:
                return {"clean": False, "waited_s": round(now - t0, 2), **snap.gauges}
            await asyncio.sleep(0.25)

    async def run(self) -> dict:
        s = self.s
        async with self.client() as h:
            models = (await h.get(self.base + "/v1/models")).json()["data"][0]
            self.model, max_len = models["id"], int(models["max_model_len"])
            info_r = await h.get(self.base + "/server_info")
            info = info_r.json() if info_r.status_code == 200 else {}
            queue = int(info.get("max_waiting_requests") or s.max_waiting_requests)
            self.burst_size = max(1, round(s.burst_factor * queue))
            self.pool = await build_pool(h, self.base, self.model, max_len, random.Random(s.seed))
            before = await scrape(h, self.base)
            sampler = asyncio.create_task(self.watch.run())
            t0 = time.monotonic()
            await self.phase(h, "warm-up", s.warmup, s.seed * 2)
            idle_warm = await self.wait_idle(h)
            start = self.watch.sample()
            t1 = time.monotonic()
            await self.phase(h, "soak", s.duration, s.seed * 2 + 1)
            soak_s = time.monotonic() - t1
            idle = await self.wait_idle(h)
            end = self.watch.sample()
            try:
                after = await scrape(h, self.base)
            except httpx.HTTPError:
                after = MetricsSnapshot()      # the server is gone: the counter check fails, the report stands
            sampler.cancel()
        return {"model": self.model, "max_model_len": max_len, "max_waiting_requests": queue,
                "max_num_seqs": (info.get("engine_config") or {}).get("max_num_seqs"),
                "burst_size": self.burst_size, "kernels_isa": ((info.get("inference_paths") or {}).get("kernels")
                                                               or {}).get("isa"),
                "elapsed_s": round(time.monotonic() - t0, 1), "soak_s": round(soak_s, 1),
                "before": before, "after": after, "idle_after_warmup": idle_warm, "idle": idle,
                "start": start, "end": end, "peak_rss": self.watch.peak_rss, "peak_threads": self.watch.peak_threads,
                "watch_lost": self.watch.lost}


def _tally(records: list[_Record]) -> dict:
    t = Counter()
    for r in records:
        o = r.result.outcome
        t[o] += 1
        if o in ("finished", "cancelled", "lost"):
            t[f"{o}_choices"] += r.n
        if r.result.reason == "503 overloaded":
            t["overloaded"] += 1
        elif r.result.reason.startswith("429"):
            t["throttled"] += 1
    return {k: t.get(k, 0) for k in ("finished", "finished_choices", "rejected", "cancelled", "cancelled_choices",
                                      "lost", "lost_choices", "overloaded", "throttled")}


def summarize(records: list[_Record]) -> dict:
    by_kind: dict[str, Counter] = {}
    reasons = {o: Counter() for o in OUTCOMES}
    for r in records:
        by_kind.setdefault(r.result.kind, Counter())[r.result.outcome] += 1
        reasons[r.result.outcome][r.result.reason or "-"] += 1
    res = [r.result for r in records]
    coverage: dict[str, Counter] = {}
    for r in records:
        for tag in r.tags:
            coverage.setdefault(tag, Counter())[r.result.outcome] += 1
    latency = {"e2e_s": percentiles([x.e2e for x in res if x.outcome == "finished"]),
               "ttft_s": percentiles([x.ttft for x in res if x.ttft is not None and x.outcome != "lost"])}
    per_kind_latency = {k: {"e2e_s": percentiles([x.e2e for x in res if x.kind == k and x.outcome == "finished"]),
                            "ttft_s": percentiles([x.ttft for x in res if x.kind == k and x.ttft is not None
                                                   and x.outcome != "lost"])}
                        for k in by_kind}
    return {
        "total": len(records),
        "by_outcome": {o: sum(1 for x in res if x.outcome == o) for o in OUTCOMES},
        "by_phase": {p: dict(Counter(r.result.outcome for r in records if r.phase == p))
                     for p in ("warm-up", "soak")},
        "by_kind": {k: {o: c.get(o, 0) for o in OUTCOMES} for k, c in sorted(by_kind.items())},
        "coverage": {t: {"total": sum(c.values()), **{o: c.get(o, 0) for o in OUTCOMES}}
                     for t, c in sorted(coverage.items())},
        "reasons": {o: dict(c.most_common()) for o, c in reasons.items() if c},
        "lost_examples": [asdict(x) for x in res if x.outcome == "lost"][:20],
        "latency": latency,
        "latency_by_kind": per_kind_latency,
    }


def _machine() -> dict:
    from kvloom.kernels.build import cpu_info
    from kvloom.system_info import stack_description
    cpu = cpu_info()
    return {"cpu_class": cpu.isa, "cpu_features": list(cpu.features), **stack_description()}


def run_soak(s: SoakSettings) -> dict:
    """Launch (or attach to) the server, run warm-up and soak, audit; the result as a JSON-able dict."""
    server = None
    if s.base_url:
        require_loopback(s.base_url)
        base, pid = s.base_url.rstrip("/"), s.server_pid
    else:
        server = ServerProcess(s.model, s.max_waiting_requests, shlex.split(s.serve_args), s.server_log)
        server.start()
        base, pid = server.base_url, server.pid
    soak = _Soak(s, base, pid)
    try:
        run = asyncio.run(soak.run())
    finally:
        exit_code = server.stop() if server is not None else None
    return audit(s, soak.records, run, server, pid)


def audit(s: SoakSettings, records: list[_Record], run: dict, server: ServerProcess | None,
          pid: int | None) -> dict:
    tally = _tally(records)
    summary = summarize(records)
    before, after = run["before"], run["after"]
    delta = {k: after.outcomes.get(k, 0) - before.outcomes.get(k, 0)
             for k in set(after.outcomes) | set(before.outcomes)}
    counters = {"before": before.outcomes, "after": after.outcomes, "delta": delta, **check_counters(tally, delta)}
    checks = {"no_lost_requests": tally["lost"] == 0, "server_counters_consistent": counters["ok"],
              "idle_clean": run["idle"]["clean"],
              "every_outcome_occurred": tally["finished"] > 0 and tally["overloaded"] > 0 and tally["cancelled"] > 0}
    memory = threads = None
    if pid and not (run["start"] and run["end"]):
        checks["server_process_alive"] = False
        memory = {"not_measured": run.get("watch_lost") or "the server process was not sampled"}
    if pid and run["start"] and run["end"]:
        (rss0, th0), (rss1, th1) = run["start"], run["end"]
        growth = (rss1 - rss0) / MIB
        memory = {"rss_start_mib": round(rss0 / MIB, 1), "rss_end_mib": round(rss1 / MIB, 1),
                  "rss_peak_mib": round(max(run["peak_rss"], rss1) / MIB, 1), "growth_mib": round(growth, 1),
                  "bound_mib": s.max_rss_growth_mib, "measured": "after the warm-up (idle) vs after the soak (idle)"}
        threads = {"start": th0, "end": th1, "peak": run.get("peak_threads"), "bound_growth": s.max_thread_growth}
        checks["rss_growth_within_bound"] = growth <= s.max_rss_growth_mib
        checks["thread_growth_within_bound"] = th1 - th0 <= s.max_thread_growth
    server_info = {"launched": server is not None, "base_url": server.base_url if server else s.base_url, "pid": pid,
                   "model": run["model"], "max_model_len": run["max_model_len"],
                   "max_waiting_requests": run["max_waiting_requests"], "max_num_seqs": run["max_num_seqs"],
                   "kernels_isa": run["kernels_isa"]}
    if server is not None:
        n_tb, first_tb = tracebacks(server.log_text())
        server_info.update(cmd=server.cmd, log=server.log_path, exit_code=server.exit_code, tracebacks=n_tb,
                           first_traceback=first_tb)
        checks["server_exit_code_0"] = server.exit_code == 0
        checks["no_tracebacks_in_server_log"] = n_tb == 0
    return {
        "command": " ".join(shlex.quote(a) for a in getattr(sys, "orig_argv", sys.argv)),
        "settings": asdict(s),
        "passed": all(checks.values()),
        "checks": checks,
        "duration_s": run["soak_s"], "elapsed_s": run["elapsed_s"], "burst_size": run["burst_size"],
        "requests": summary, "tally": tally,
        "server_counters": counters,
        "idle": run["idle"], "idle_after_warmup": run["idle_after_warmup"],
        "memory": memory, "threads": threads,
        "server": server_info,
        "machine": _machine(),
    }


def format_report(r: dict) -> str:
    req, srv = r["requests"], r["server"]
    lines = [f"kvloom bench soak: {req['total']} requests, {r['duration_s']:.0f} s soak "
             f"({r['settings']['duration']:g} s sending, then draining) after {r['settings']['warmup']:g} s "
             f"warm-up ({r['elapsed_s']:.0f} s in all); {srv['model']} (context {srv['max_model_len']}, "
             f"max_waiting_requests {srv['max_waiting_requests']}, bursts of "
             f"{r['burst_size']}), CPU class {r['machine']['cpu_class']}"]
    lines.append("outcomes: " + "  ".join(f"{o} {c}" for o, c in req["by_outcome"].items()))
    for o, reasons in req["reasons"].items():
        lines.append(f"  {o:<10}" + ", ".join(f"{k}: {v}" for k, v in list(reasons.items())[:8]))
    lines.append(f"{'kind':<34}{'finished':>9}{'rejected':>9}{'cancel':>8}{'lost':>6}{'e2e p50/p99 s':>18}"
                 f"{'ttft p50/p99 s':>18}")
    fmt = lambda d: f"{d['p50']:.2f}/{d['p99']:.2f}" if d["count"] else "-"   # noqa: E731
    for kind, c in req["by_kind"].items():
        lat = req["latency_by_kind"][kind]
        lines.append(f"{kind:<34}{c['finished']:>9}{c['rejected']:>9}{c['cancelled']:>8}{c['lost']:>6}"
                     f"{fmt(lat['e2e_s']):>18}{fmt(lat['ttft_s']):>18}")
    lat = req["latency"]
    lines.append(f"{'all':<34}{'':>32}{fmt(lat['e2e_s']):>18}{fmt(lat['ttft_s']):>18}")
    lines.append("mix (requests/finished): " + ", ".join(f"{t} {c['total']}/{c['finished']}"
                                                         for t, c in req["coverage"].items()))
    sc = r["server_counters"]
    lines.append(f"server kvloom_requests_total delta: {json.dumps(sc['delta'], sort_keys=True)}; bounds from the "
                 f"clients: {json.dumps(sc['bounds'])}")
    idle = r["idle"]
    lines.append(f"idle after {idle['waited_s']} s: running {idle.get('kvloom_num_requests_running')}, waiting "
                 f"{idle.get('kvloom_num_requests_waiting')}, KV blocks in use "
                 f"{idle.get('kvloom_kv_cache_blocks_used')} (of which sessions' "
                 f"{idle.get('kvloom_session_kv_blocks')})")
    if r["memory"] and "not_measured" in r["memory"]:
        lines.append(f"server RSS and threads not measured: {r['memory']['not_measured']}")
    elif r["memory"]:
        m, t = r["memory"], r["threads"]
        lines.append(f"server RSS {m['rss_start_mib']} -> {m['rss_end_mib']} MiB (peak {m['rss_peak_mib']}), growth "
                     f"{m['growth_mib']} MiB, bound {m['bound_mib']}; threads {t['start']} -> {t['end']} "
                     f"(peak {t['peak']}), bound +{t['bound_growth']}")
    if srv["launched"]:
        lines.append(f"server exit code {srv['exit_code']}, tracebacks in its log {srv['tracebacks']} ({srv['log']})")
    for ex in req["lost_examples"][:5]:
        lines.append(f"  lost: {ex['kind']} status {ex['status']}: {ex['reason']}")
    failed = [k for k, ok in r["checks"].items() if not ok]
    lines.append("PASS" if r["passed"] else f"FAIL: {', '.join(failed)}")
    return "\n".join(lines)


def cmd_bench_soak(args) -> dict:
    s = SoakSettings(model=args.model, base_url=args.base_url, server_pid=args.server_pid, api_key=args.api_key,
                     duration=args.duration, warmup=args.warmup, concurrency=args.concurrency, seed=args.seed,
                     max_waiting_requests=args.max_waiting_requests, serve_args=args.serve_args,
                     burst_interval=args.burst_interval, burst_factor=args.burst_factor,
                     request_timeout=args.request_timeout, max_requests=args.max_requests,
                     idle_timeout=args.idle_timeout, max_rss_growth_mib=args.max_rss_growth_mib,
                     max_thread_growth=args.max_thread_growth, server_log=args.server_log,
                     progress=not args.no_progress)
    result = run_soak(s)
    print(format_report(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    if not result["passed"]:
        raise SystemExit(1)
    return result


def add_soak_args(p) -> None:
    d = SoakSettings()
    p.add_argument("model", nargs="?", default=None,
                   help="model the launched server serves (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--base-url", default=None, help="soak this running server instead (loopback only)")
    p.add_argument("--server-pid", type=int, default=None, help="with --base-url: its pid, for memory and threads")
    p.add_argument("--api-key", default=None)
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of soak after the warm-up")
    p.add_argument("--warmup", type=float, default=d.warmup,
                   help="seconds of the same mix first; memory and threads are measured from its end")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="clients sending back to back")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the request mix")
    p.add_argument("--max-waiting-requests", type=int, default=d.max_waiting_requests,
                   help="the launched server's admission queue (past it: 503 + Retry-After)")
    p.add_argument("--serve-args", default=d.serve_args,
                   help="more flags for the launched server, given with '=': "
                        "--serve-args='--kv-cache-memory 256MiB --max-num-seqs 16'")
    p.add_argument("--burst-interval", type=float, default=d.burst_interval, help="seconds between bursts (+-30%%)")
    p.add_argument("--burst-factor", type=float, default=d.burst_factor,
                   help="a burst is this many times --max-waiting-requests, all at once")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds a request may take before it counts as lost (a hanging stream)")
    p.add_argument("--max-requests", type=int, default=d.max_requests, help="stop sending after this many")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                   help="seconds to wait, after the last answer, for the server to be idle")
    p.add_argument("--max-rss-growth-mib", type=float, default=d.max_rss_growth_mib,
                   help="allowed growth of the server's resident memory from the end of the warm-up to the end")
    p.add_argument("--max-thread-growth", type=int, default=d.max_thread_growth,
                   help="allowed growth of the server's thread count over the same span")
    p.add_argument("--server-log", default=None, help="the launched server's log (default: a temp file)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON result here")
