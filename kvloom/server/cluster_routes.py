"""What the HTTP server adds over a cluster front (kvloom/cluster/front.py): per-instance metrics, the
instances in /server_info, and the operator's routes.

    POST /admin/migrate                    {"request_id": id, "to": instance or null, "precopy_rounds": k}
    POST /admin/instances/{i}/drain        move everything out, take nothing new (scale-down)
    POST /admin/instances/{i}/undrain      back in service

The id is the one the client's response carries (a response of several prompts names all of them). The
API key, when set, guards these routes like every other non-public one.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from pydantic import BaseModel, Field

_DOWNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MigrateRequest(BaseModel):
    request_id: str
    to: int | None = None
    precopy_rounds: int = Field(default=0, ge=0, le=16)


def cluster_router(cluster) -> APIRouter:
    router = APIRouter()

    @router.post("/admin/migrate")
    async def migrate(body: MigrateRequest):
        if body.to is not None:
            cluster._check_instance(body.to)
        ids = cluster.resolve(body.request_id)
        if not ids:
            return JSONResponse({"error": {"message": f"no running request {body.request_id!r}",
                                           "type": "not_found_error", "param": "request_id"}}, status_code=404)
        moved = await asyncio.gather(*[cluster.migrate(r, body.to, precopy_rounds=body.precopy_rounds)
                                       for r in ids])
        return {"request_id": body.request_id,
                "moved": [{"request_id": r, "ok": ok, "instance": cluster.where(r)} for r, ok in zip(ids, moved)]}

    @router.post("/admin/instances/{instance}/drain")
    async def drain(instance: int):
        cluster.drain(instance)
        return {"id": instance, "state": cluster.states[instance]}

    @router.post("/admin/instances/{instance}/undrain")
    async def undrain(instance: int):
        cluster.undrain(instance)
        return {"id": instance, "state": cluster.states[instance]}

    return router


def cluster_health(cluster) -> tuple[int, dict]:
    """200 "ok" when every instance serves; 200 "degraded" while one is down, draining or drained but
    another serves; 503 when none does."""
    states = list(cluster.states)
    serving = sum(st == "serving" for st in states)
    status = "ok" if serving == len(states) else "degraded" if serving else "unavailable"
    return (200 if serving else 503), {"status": status,
                                       "instances": [{"id": i, "state": st} for i, st in enumerate(states)]}


class ClusterCollector:
    """Prometheus series of each instance (label `instance`) and of migration, read at scrape time from
    the front's latest load reports and counters."""

    def __init__(self, cluster):
        self.cluster = cluster

    def collect(self):
        c = self.cluster
        loads, states, stats = c.loads(), list(c.states), c.stats
        up = GaugeMetricFamily("kvloom_instance_up", "1 while the instance serves (0: down, draining or drained)",
                               labels=["instance", "state"])
        running = GaugeMetricFamily("kvloom_instance_num_requests_running", "Requests running on the instance",
                                    labels=["instance"])
        waiting = GaugeMetricFamily("kvloom_instance_num_requests_waiting", "Requests queued on the instance",
                                    labels=["instance"])
        free = GaugeMetricFamily("kvloom_instance_kv_cache_blocks_free", "Free KV blocks of the instance",
                                 labels=["instance"])
        for l in loads:
            i = str(l.instance_id)
            st = states[l.instance_id] if l.instance_id < len(states) else "serving"
            up.add_metric([i, st], 1.0 if st == "serving" else 0.0)
            running.add_metric([i], l.running)
            waiting.add_metric([i], l.waiting)
            free.add_metric([i], l.free_blocks)
        moves = CounterMetricFamily("kvloom_migrations", "Live migrations of running requests by reason",
                                    labels=["reason"])
        for reason, n in sorted(stats.count.items()):
            moves.add_metric([reason], n)
        failed = CounterMetricFamily("kvloom_migrations_failed", "Migrations that did not complete (the request "
                                     "stayed or resumed)")
        failed.add_metric([], stats.failed)
        kv = CounterMetricFamily("kvloom_migration_kv_bytes", "KV bytes shipped by migrations (pre-copy included)")
        kv.add_metric([], stats.kv_bytes)
        resumed = CounterMetricFamily("kvloom_requests_resumed_after_fault",
                                      "Requests resumed on another instance after theirs died")
        resumed.add_metric([], stats.resumed_after_fault)
        lost = CounterMetricFamily("kvloom_requests_lost_after_fault", "Requests no live instance could resume")
        lost.add_metric([], stats.lost_after_fault)
        yield from (up, running, waiting, free, moves, failed, kv, resumed, lost, _histogram(stats.downtime_seconds))


def _histogram(samples: list[float]) -> HistogramMetricFamily:
    h = HistogramMetricFamily("kvloom_migration_downtime_seconds",
                              "How long a migrated request was stopped (final export to imported)")
    buckets = [(str(b), sum(s <= b for s in samples)) for b in _DOWNTIME_BUCKETS] + [("+Inf", len(samples))]
    h.add_metric([], buckets, sum_value=sum(samples))
    return h
