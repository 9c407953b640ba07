"""The cluster front: AsyncEngine's interface over N engine actors, with a global scheduler and migration.

    generate(prompt, params, request_id, session_id) -> async iterator of RequestOutput
    abort(request_id), is_alive, start(), shutdown(), migrate(request_id, to=None)

One poller thread polls every actor in turn (one remote call per actor per round, bringing a batch of
step outputs and the instance's load) and hands the outputs to the requests' asyncio queues, one wake-up
per event loop per round. New requests go where the dispatch policy says (kvloom/cluster/dispatch.py),
over the latest load reports adjusted by what was dispatched since.

Instances are "serving", "draining" (everything moves out; nothing new comes in), "drained" (empty, takes
no work: scaled down) or "down" (its actor died: its requests resume elsewhere from the tokens they
streamed, and Ray restarts it; once it answers again it rejoins, empty).

A rebalancer thread applies Llumnix's triggers (kvloom/cluster/rebalance.py) to the reports every
`rebalance_interval` seconds and migrates what they say.

Migration is stop-and-copy: export on the source (the KV goes along, through Ray's object store, straight
to the destination), one more poll of the source (the outputs of its steps before the export), import on
the destination. The source's poll lock is held throughout, so the poller cannot deliver source outputs
out of order, and the destination only produces outputs after the import: the client's stream has no gap
and no repeat, and the tokens are those of no migration (greedy, and seeded: the RNG state moves too).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kvloom.cluster.dispatch import NoInstanceError, make_policy
from kvloom.cluster.engine_actor import engine_actor_class
from kvloom.cluster.load import LoadReport
from kvloom.cluster.rebalance import RebalanceSettings, plan_moves
from kvloom.config import EngineConfig
from kvloom.engine.outputs import RequestOutput
from kvloom.errors import InvalidRequestError, KvloomError, RequestFailedError
from kvloom.sampling_params import SamplingParams
from kvloom.server.async_engine import EngineDeadError, put_all

log = logging.getLogger(__name__)


class ClusterDeadError(EngineDeadError):
    """The cluster front has shut down or its poller died, or no instance can take a request (HTTP 503)."""


@dataclass
class _Record:
    """What the front keeps of a request to resume it if its instance dies: how it was asked for, and the
    last output of each sample (tokens and logprobs so far)."""

    prompt: list[int] | str
    params: SamplingParams
    arrival_time: float
    session_id: str | None
    cache_salt: str | None
    priority: int
    lora: str | None = None
    last: dict[int, RequestOutput] = field(default_factory=dict)


@dataclass
class MigrationStats:
    count: dict[str, int] = field(default_factory=dict)        # by reason
    failed: int = 0
    kv_bytes: int = 0
    downtime_seconds: list[float] = field(default_factory=list)  # the request paused: final stop to resumed
    resumed_after_fault: int = 0
    lost_after_fault: int = 0


class ClusterEngine:
    def __init__(self, config: EngineConfig, num_instances: int = 2, policy: str = "llumnix",
                 threads_per_instance: int = 1, cpus_per_instance: float = 1, ray_init: dict | None = None,
                 poll_interval: float = 0.005, rebalance_interval: float | None = 0.2,
                 rebalance: RebalanceSettings | None = None, precopy_rounds: int = 2,
                 placement: str = "SPREAD", max_restarts: int = -1):
        if num_instances < 1:
            raise InvalidRequestError("a cluster needs at least one instance", field="instances")
        self.config = dataclasses.replace(config, num_threads=threads_per_instance or config.num_threads)
        self.num_instances = num_instances
        self.policy_name = policy
        self._policy = make_policy(policy)
        self._cpus = cpus_per_instance
        self._ray_init = ray_init
        self._poll_interval = poll_interval
        self._rebalance_interval = rebalance_interval
        self.rebalance_settings = rebalance or RebalanceSettings()
        self.precopy_rounds = precopy_rounds
        self._placement = placement
        self._max_restarts = max_restarts
        self._placement_group = None
        self.actors: list = []
        self.states: list[str] = []                      # per instance: serving | draining | drained | down
        self._records: dict[str, _Record] = {}
        self._recently_moved: dict[str, float] = {}      # request id -> when (no ping-pong)
        self.stats = MigrationStats()
        self._last_stats: dict[int, dict] = {}            # instance -> its last dashboard figures
        self.auto_rebalance = True                       # False: rebalance_once() only when called
        self._rebalancer = threading.Thread(target=self._rebalance_loop, name="kvloom-cluster-rebalancer",
                                            daemon=True)
        self._loads: list[LoadReport] = []              # as last reported
        self._sent: list[list[tuple[int, int]]] = []    # per instance: (add call number, its block demand)
        self._num_sent: list[int] = []
        self._poll_locks: list[threading.Lock] = []
        self._where: dict[str, int] = {}                 # parent request id -> instance holding it
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._unfinished: dict[str, int] = {}            # parent id -> samples still running
        self._migrating: dict[str, bool] = {}            # parent id -> aborted while moving
        self._lock = threading.Lock()                    # guards the dicts above and _loads
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._started = False
        self._thread = threading.Thread(target=self._poll_loop, name="kvloom-cluster-poller", daemon=True)
        self.num_migrations = 0
        self.last_migration: dict = {}
        self.placements: collections.deque = collections.deque(maxlen=10_000)   # (request id, instance)

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(**(self._ray_init or {"include_dashboard": False}))
        cls = engine_actor_class(self._cpus, self._max_restarts)
        self.actors = [cls.options(**self._placement_options(i)).remote(self.config, i)
                       for i in range(self.num_instances)]
        ray.get([a.ready.remote() for a in self.actors])
        self._loads = ray.get([a.load.remote() for a in self.actors])
        self.states = ["serving"] * len(self.actors)
        self._poll_locks = [threading.Lock() for _ in self.actors]
        self._sent = [[] for _ in self.actors]
        self._num_sent = [0] * len(self.actors)
        self._started = True
        self._thread.start()
        if self._rebalance_interval:
            self._rebalancer.start()

    def _placement_options(self, i: int) -> dict:
        """One bundle per instance in a placement group: SPREAD puts instances on different nodes when the
        cluster has them (on one machine they share it); PACK keeps them together."""
        if not self._placement:
            return {}
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self._placement_group is None:
            self._placement_group = placement_group([{"CPU": self._cpus}] * self.num_instances,
                                                    strategy=self._placement)
            import ray
            ray.get(self._placement_group.ready(), timeout=120)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self._placement_group,
                                                                        placement_group_bundle_index=i)}

    def shutdown(self, timeout: float = 10.0) -> None:
        import ray

        self._stop.set()
        for t in (self._thread, self._rebalancer):
            if t.ident is not None:
                t.join(timeout)
        self._fail_everything(ClusterDeadError("the cluster has shut down"))
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception as e:  # noqa: BLE001 - shutting down: an actor already gone is fine, but say so
                log.info("cluster shutdown: actor %s was already gone (%s)", a, e)
        self.actors = []
        if self._placement_group is not None:
            from ray.util.placement_group import remove_placement_group
            try:
                remove_placement_group(self._placement_group)
            except Exception as e:  # noqa: BLE001 - Ray already shut down
                log.info("cluster shutdown: placement group already gone (%s)", e)
            self._placement_group = None

    @property
    def is_alive(self) -> bool:
        return self._started and self._thread.is_alive() and self._dead is None and not self._stop.is_set()

    # ---- requests ------------------------------------------------------------------------

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
                       session_id: str | None = None, cache_salt: str | None = None,
                       priority: int = 0, lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the outputs of the request's n samples until all finish; aborts it if the consumer stops early.
        lora: an adapter every instance loaded at start (the config's lora_modules)."""
        if not self.is_alive:
            raise ClusterDeadError("the cluster is not running")
        request_id = request_id or uuid.uuid4().hex
        if not params.greedy and params.seed is None:
            # The front picks the seed, so a request resumed after a fault draws what it would have.
            params = dataclasses.replace(params, seed=random.getrandbits(63))
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        arrival = time.time()
        with self._lock:
            if request_id in self._sinks:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", field="request_id")
            self._sinks[request_id] = (loop, sink)
            self._unfinished[request_id] = params.n
            self._records[request_id] = _Record(prompt, params, arrival, session_id, cache_salt, priority, lora)
        remaining = params.n
        try:
            await self._add(prompt, params, request_id, arrival, session_id, cache_salt, priority, lora)
            while remaining:
                item = await sink.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item.finished
                yield item
        except BaseException as e:
            if remaining:
                self.abort(request_id)
            if isinstance(e, Exception) and hasattr(e, "as_instanceof_cause"):   # a RayTaskError: its cause
                raise e.as_instanceof_cause() from None
            raise
        finally:
            if not remaining:
                with self._lock:
                    self._forget(request_id)

    async def _add(self, prompt, params, request_id, arrival, session_id, cache_salt, priority, lora) -> None:
        """Place and add the request. An instance found dead on the way is marked down, which resumes its
        requests elsewhere; this one too, unless the poller's resumption got it first."""
        import ray

        target = await self._choose(prompt, request_id, cache_salt, lora)
        try:
            await self.actors[target].add_request.remote(prompt, params, request_id, arrival, session_id,
                                                         cache_salt, priority, lora)
        except ray.exceptions.RayActorError:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._instance_down, target, "an add_request call failed")
            with self._lock:
                mine = self._where.get(request_id) == target
                if mine:
                    del self._where[request_id]
            if mine:
                await loop.run_in_executor(None, self._resume, request_id)

    async def _choose(self, prompt, request_id: str, cache_salt: str | None = None, lora: str | None = None) -> int:
        """The policy's instance for a new request, counted in that instance's load at once (so concurrent
        arrivals see each other)."""
        prefix = None
        if self.policy_name == "llumnix" and not isinstance(prompt, str):
            serving = [i for i, st in enumerate(self.states) if st == "serving"]
            counts = await asyncio.gather(*[self.actors[i].cached_prefix_blocks.remote(prompt, cache_salt, lora)
                                            for i in serving], return_exceptions=True)
            prefix = {i: c for i, c in zip(serving, counts) if isinstance(c, int)}
        with self._lock:
            try:
                target = self._policy(self._effective_loads(), prefix_blocks=prefix, prompt_len=len(prompt))
            except NoInstanceError:
                raise ClusterDeadError("no engine instance is serving") from None
            self._where[request_id] = target
            self._note_dispatch(target, len(prompt))
            self.placements.append((request_id, target))
        return target

    def _note_dispatch(self, i: int, prompt_len: int) -> None:
        """Count a dispatched request in the instance's load until a report shows the instance has it."""
        self._sent[i].append((self._num_sent[i], -(-(prompt_len + 1) // self._loads[i].block_size)))
        self._num_sent[i] += 1

    def _effective_loads(self) -> list[LoadReport]:
        """The last reports, plus the requests dispatched to each instance that its report does not show yet."""
        out = []
        for i, l in enumerate(self._loads):
            pending = [d for seq, d in self._sent[i] if seq >= l.num_add_calls]
            if pending:
                after = l.free_after_queue - sum(pending)
                l = dataclasses.replace(l, waiting=l.waiting + len(pending), free_after_queue=after,
                                        queued_demand_blocks=l.queued_demand_blocks + sum(pending),
                                        freeness=after / max(1, l.running))
            state = self.states[i] if i < len(self.states) else "serving"
            if state != "serving":
                # Draining counts as full (Llumnix); drained and down instances take nothing.
                l = dataclasses.replace(l, draining=state == "draining", alive=state in ("serving", "draining"),
                                        freeness=-math.inf)
            out.append(l)
        return out

    def abort(self, request_id: str) -> None:
        with self._lock:
            where = self._where.get(request_id)
            if request_id in self._migrating:
                self._migrating[request_id] = True     # aborted on arrival at the destination
            self._forget(request_id)
        if where is not None and self.actors:
            self.actors[where].abort.remote(request_id)

    async def close_session(self, session_id: str) -> bool:
        """Release an agent session's retained KV on every instance (it lives where its turns ran)."""
        released = await asyncio.gather(*[a.close_session.remote(session_id) for a in self.actors])
        return any(released)

    def _forget(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._unfinished.pop(request_id, None)
        self._where.pop(request_id, None)
        self._records.pop(request_id, None)
        self._recently_moved.pop(request_id, None)

    def where(self, request_id: str) -> int | None:
        with self._lock:
            return self._where.get(request_id)

    # ---- migration -----------------------------------------------------------------------

    def resolve(self, request_id: str) -> list[str]:
        """The running request ids a client's id names: itself, or for a response of several prompts
        (ids `<id>-0`, `<id>-1`, ...) all of them."""
        with self._lock:
            if request_id in self._where:
                return [request_id]
            return sorted(r for r in self._where if r.startswith(request_id + "-") and r[len(request_id) + 1:].isdigit())

    def migrate_sync(self, request_id: str, to: int | None = None, with_kv: bool = True,
                     precopy_rounds: int = 0, reason: str = "manual") -> bool:
        """Move a running request to instance `to` (None: the freest other one). False when the request is
        no longer running anywhere (finished, aborted, or already moving) or `to` cannot take it.

        precopy_rounds > 0: multi-stage pre-copy first (float KV, n = 1): up to that many rounds copy the
        request's newly full blocks to the destination while it keeps decoding; the final stop then ships
        only the blocks filled since. self.last_migration tells how many blocks went in each phase and how
        long the request was stopped."""
        import ray

        with self._lock:
            src = self._where.get(request_id)
            if src is None or request_id in self._migrating or self.states[src] == "down":
                return False
            if to is None:
                others = [l for l in self._effective_loads() if l.instance_id != src and l.alive and not l.draining]
                if not others:
                    return False
                to = max(others, key=lambda l: (l.freeness, -l.instance_id)).instance_id
            if to == src or not 0 <= to < len(self.actors) or self.states[to] not in ("serving",):
                return False
            self._migrating[request_id] = False
        lost: int | None = None
        try:
            precopied, staged_bytes = [], 0
            if precopy_rounds and with_kv:
                precopied, staged_bytes = self._precopy(request_id, src, to, precopy_rounds)
            with self._poll_locks[src]:
                stopped = time.perf_counter()
                try:
                    if precopied:
                        snap, exported, skip, nbytes = self.actors[src].export_after_precopy.options(
                            num_returns=4).remote(request_id, precopied, with_kv)
                        skip = ray.get(skip)
                    else:
                        snap, exported, nbytes = self.actors[src].export_for_migration.options(
                            num_returns=3).remote(request_id, with_kv)
                        skip = 0
                    exported = ray.get(exported)
                    export_s = time.perf_counter() - stopped
                    # The outputs of the source's steps before the export (and, if it finished, its last).
                    outputs, load = ray.get(self.actors[src].poll.remote())
                except ray.exceptions.RayActorError:
                    lost = src          # the source died: its requests resume from their streamed tokens
                    raise
                self._deliver(outputs, src, load)
                if not exported:
                    if precopied:
                        self._try(self.actors[to].drop_staged.remote(request_id))
                    return False
                if precopied:
                    ok = self._import_staged(snap, skip, to)
                    if not ok:       # the snapshot lacks the pre-copied blocks: recompute at the source
                        ray.get(self.actors[src].import_request.remote(ray.get(snap).without_kv()))
                else:
                    ok = self._import(snap, to)
                    if not ok and not self._import(snap, src):
                        self._fail_request(request_id, KvloomError(
                            f"request {request_id} could not be imported on instance {to} nor back on {src}"))
                if not ok:
                    if self._actor_gone(to):
                        lost = to
                    to = src
                downtime = time.perf_counter() - stopped
                with self._lock:
                    aborted = self._migrating.pop(request_id)
                    if request_id in self._sinks:
                        self._where[request_id] = to
                    self._recently_moved[request_id] = time.monotonic()
                    if ok:
                        self.stats.count[reason] = self.stats.count.get(reason, 0) + 1
                        self.stats.kv_bytes += ray.get(nbytes) + staged_bytes
                        self.stats.downtime_seconds.append(downtime)
                    else:
                        self.stats.failed += 1
                self.last_migration = {"precopied_blocks": len(precopied), "reused_blocks": skip,
                                       "downtime_s": downtime, "export_s": export_s, "reason": reason, "ok": ok}
                if aborted:
                    self.actors[to].abort.remote(request_id)
                self.num_migrations += ok
                return ok
        except ray.exceptions.RayActorError as e:
            with self._lock:
                self.stats.failed += 1
            log.warning("migration of %s from %d to %d failed: %s", request_id, src, to, e)
            return False
        finally:
            with self._lock:
                self._migrating.pop(request_id, None)
            if lost is not None:
                self._instance_down(lost, "it died during a migration")

    def _try(self, ref) -> None:
        import ray
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            log.info("a clean-up call found its instance gone (%s)", e)

    def _actor_gone(self, i: int) -> bool:
        import ray
        try:
            ray.get(self.actors[i].ready.remote(), timeout=5)
            return False
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return True

    def _import(self, snap_ref, to: int) -> bool:
        import ray

        try:
            ray.get(self.actors[to].import_request.remote(snap_ref))
            return True
        except Exception as e:
            log.warning("import on instance %d failed (%s); recomputing there without KV", to, e)
        try:
            ray.get(self.actors[to].import_request.remote(ray.get(snap_ref).without_kv()))
            return True
        except Exception as e:
            log.warning("import without KV on instance %d failed too (%s)", to, e)
            return False

    def _precopy(self, request_id: str, src: int, to: int, rounds: int) -> tuple[list[int], int]:
        """Copy full blocks source -> destination (straight, through the object store) while the request
        runs on. Returns the source block ids copied ([]: pre-copy does not apply, or nothing to copy) and
        the bytes staged at the destination."""
        import ray

        copied: list[int] = []
        staged = 0
        try:
            for _ in range(rounds):
                ids_ref, kv_ref = self.actors[src].precopy_blocks.options(num_returns=2).remote(
                    request_id, len(copied))
                ids = ray.get(ids_ref)
                if not ids:
                    break
                staged += ray.get(self.actors[to].stage_blocks.remote(request_id, kv_ref))
                copied += ids
                if len(ids) <= 1:        # converged: the final stop has at most a block or two left
                    break
        except Exception as e:
            log.warning("pre-copy of %s failed (%s); stop-and-copy instead", request_id, e)
            self._try(self.actors[to].drop_staged.remote(request_id))
            return [], 0
        return copied, staged

    def _import_staged(self, snap_ref, skip: int, to: int) -> bool:
        import ray

        try:
            ray.get(self.actors[to].import_with_staged.remote(snap_ref, skip))
            return True
        except Exception as e:
            log.warning("import after pre-copy on instance %d failed (%s)", to, e)
            ray.get(self.actors[to].drop_staged.remote(getattr(ray.get(snap_ref), "request_id", "")))
            return False

    async def migrate(self, request_id: str, to: int | None = None, with_kv: bool = True,
                      precopy_rounds: int = 0, reason: str = "manual") -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self.migrate_sync, request_id, to, with_kv,
                                                                precopy_rounds, reason)

    # ---- the global scheduler: rebalancing, draining ----------------------------------------

    def _rebalance_loop(self) -> None:
        while not self._stop.wait(self._rebalance_interval):
            if not self.auto_rebalance:
                continue
            try:
                self.rebalance_once()
            except Exception:  # noqa: BLE001 - a bad round must not stop rebalancing for good
                log.exception("a rebalancing round failed")

    def rebalance_once(self) -> list:
        """One round of Llumnix's triggers over the current loads; returns the moves made."""
        now = time.monotonic()
        with self._lock:
            loads = self._effective_loads()
            self._recently_moved = {r: t for r, t in self._recently_moved.items() if now - t < self.MOVE_COOLDOWN_S}
            exclude = set(self._migrating) | set(self._recently_moved)
            held = collections.Counter(self._where.values())
            for i, st in enumerate(self.states):
                if st == "draining" and held[i] == 0 and loads[i].running == 0 and loads[i].waiting == 0:
                    self.states[i] = "drained"
                    log.info("instance %d is drained", i)
        done = []
        for m in plan_moves(loads, self.rebalance_settings, exclude):
            if self._stop.is_set():
                break
            if self.migrate_sync(m.request_id, m.dst, precopy_rounds=self.precopy_rounds, reason=m.reason):
                done.append(m)
        return done

    MOVE_COOLDOWN_S = 2.0     # a request moved is left alone this long (no ping-pong between instances)

    def drain(self, instance: int) -> None:
        """Take no new work on the instance and move its requests out (the rebalancer does, every round);
        once empty it is "drained". undrain() puts it back in service."""
        self._check_instance(instance)
        with self._lock:
            if self.states[instance] in ("serving", "draining"):
                self.states[instance] = "draining"
        if self.num_instances - sum(st != "serving" for st in self.states) < 1:
            log.warning("instance %d drains and no other instance serves: new requests will fail", instance)

    def undrain(self, instance: int) -> None:
        self._check_instance(instance)
        with self._lock:
            if self.states[instance] in ("draining", "drained"):
                self.states[instance] = "serving"

    def _check_instance(self, instance: int) -> None:
        if not 0 <= instance < len(self.actors):
            raise InvalidRequestError(f"no instance {instance} (the cluster has {len(self.actors)})", field="instance")

    # ---- faults --------------------------------------------------------------------------

    def _instance_down(self, i: int, why: str) -> None:
        """Mark instance i down (once) and resume each of its requests on another instance from the tokens
        it streamed; Ray restarts the actor and the poller lets it rejoin when it answers."""
        with self._poll_locks[i]:            # no delivery from i races the collection below
            with self._lock:
                if self.states[i] == "down":
                    return
                self.states[i] = "down"
                self._sent[i] = []
                lost = [r for r, w in self._where.items() if w == i]
                for r in lost:
                    del self._where[r]
        log.warning("instance %d is down (%s): resuming its %d requests elsewhere", i, why, len(lost))
        for r in lost:
            self._resume(r)

    def _resume(self, request_id: str) -> None:
        import ray

        with self._lock:
            rec = self._records.get(request_id)
            if rec is None or request_id not in self._sinks:
                return                       # finished or aborted meanwhile
            outputs = {}
            for k in range(rec.params.n):
                o = rec.last.get(k)
                if o is None:
                    outputs[k] = ([], None)
                elif not o.finished:
                    outputs[k] = (list(o.token_ids), None if o.logprobs is None else list(o.logprobs))
        for _ in range(len(self.actors)):
            with self._lock:
                try:
                    target = self._policy(self._effective_loads(), prompt_len=len(rec.prompt))
                except NoInstanceError:
                    break
                self._where[request_id] = target
                self._note_dispatch(target, len(rec.prompt))
            try:
                ray.get(self.actors[target].resume_request.remote(
                    request_id, rec.prompt, rec.params, outputs, rec.arrival_time, rec.session_id,
                    rec.cache_salt, rec.priority, rec.lora))
                with self._lock:
                    self.stats.resumed_after_fault += 1
                return
            except ray.exceptions.RayActorError:
                with self._lock:
                    self._where.pop(request_id, None)
                self._instance_down(target, "a resume_request call failed")
            except Exception as e:  # noqa: BLE001 - e.g. the prompt does not fit: tell the client
                with self._lock:
                    self._where.pop(request_id, None)
                self._fail_request(request_id, e)
                return
        with self._lock:
            self.stats.lost_after_fault += 1
        self._fail_request(request_id, ClusterDeadError(f"request {request_id}'s instance died and no other "
                                                        "instance could take it"))

    def _fail_request(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            entry = self._sinks.get(request_id)
            self._forget(request_id)
        if entry is not None:
            try:
                entry[0].call_soon_threadsafe(entry[1].put_nowait, error)
            except RuntimeError:
                pass

    # ---- the poller ----------------------------------------------------------------------

    def loads(self) -> list[LoadReport]:
        with self._lock:
            return self._effective_loads()

    def info(self) -> list[dict]:
        import ray
        return ray.get([a.info.remote() for a in self.actors])

    def instances(self, timeout: float = 2.0) -> list[dict]:
        """Each instance as /server_info shows it: id, state, node, process, threads, load and the ids of the
        requests it runs and queues (the ids clients see)."""
        import ray

        refs = [a.info.remote() for a in self.actors]
        with self._lock:
            loads = list(self._loads)
            states = list(self.states)
        out = []
        for i, ref in enumerate(refs):
            try:
                info = ray.get(ref, timeout=timeout) if states[i] != "down" else {}
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                info = {"error": str(e).splitlines()[0]}
            load = loads[i]
            out.append({"id": i, "state": states[i], "node_id": info.get("node_id"), "pid": info.get("pid"),
                        "threads": info.get("torch_threads"), "num_steps": info.get("num_steps"),
                        "load": load.as_dict() | {"requests": None},
                        "running": [r.request_id for r in load.requests if r.running],
                        "waiting": [r.request_id for r in load.requests if not r.running],
                        **({"error": info["error"]} if "error" in info else {})})
        return out

    def dashboard_stats(self, timeout: float = 2.0) -> list[dict]:
        """Each instance's dashboard figures with its state; an unreachable one shows its last figures."""
        import ray

        refs = {i: a.dashboard_stats.remote() for i, a in enumerate(self.actors) if self.states[i] != "down"}
        for i, ref in refs.items():
            try:
                self._last_stats[i] = ray.get(ref, timeout=timeout)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
        return [{**self._last_stats.get(i, {"id": str(i)}), "state": st} for i, st in enumerate(self.states)]

    PROBE_INTERVAL_S = 0.5    # how often a down instance is asked whether Ray has restarted it

    def _poll_loop(self) -> None:
        import ray

        probes: dict[int, tuple] = {}       # down instance -> (its pending ready() ref, when sent)
        try:
            while not self._stop.is_set():
                got = 0
                for i, actor in enumerate(self.actors):
                    state = self.states[i]
                    if state == "down":
                        self._probe(i, probes)
                        continue
                    if state == "drained":
                        continue
                    try:
                        with self._poll_locks[i]:
                            outputs, load = ray.get(actor.poll.remote())
                            self._deliver(outputs, i, load)
                        got += len(outputs)
                    except ray.exceptions.RayActorError as e:
                        self._instance_down(i, f"its actor died: {type(e).__name__}")
                    except ray.exceptions.RayTaskError as e:   # its step loop died: a fresh actor, same place
                        log.error("instance %d failed: %s; restarting it", i, e)
                        ray.kill(actor, no_restart=False)
                        self._instance_down(i, "its step loop died")
                if not got:
                    time.sleep(self._poll_interval)
        except BaseException as e:
            if not self._stop.is_set():
                log.exception("cluster poller died")
                self._dead = e
                self._fail_everything(ClusterDeadError(f"the cluster poller stopped: {e!r}"))

    def _probe(self, i: int, probes: dict) -> None:
        """Rejoin a down instance once its restarted actor answers (empty: reset drops anything left)."""
        import ray

        ref, sent = probes.get(i, (None, 0.0))
        if ref is None:
            if time.monotonic() - sent >= self.PROBE_INTERVAL_S:
                probes[i] = (self.actors[i].reset.remote(), time.monotonic())
            return
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return
        try:
            load = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
            probes[i] = (None, time.monotonic())
            return
        del probes[i]
        with self._lock:
            self._loads[i] = load
            self._sent[i] = []
            self._num_sent[i] = load.num_add_calls
            self.states[i] = "serving"
        log.info("instance %d is back", i)

    def _deliver(self, outputs: list[RequestOutput], instance: int, load: LoadReport) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            self._loads[instance] = load
            self._sent[instance] = [e for e in self._sent[instance] if e[0] >= load.num_add_calls]
            for out in outputs:
                entry = self._sinks.get(out.parent_id)
                if entry is None:
                    continue
                record = self._records.get(out.parent_id)
                if record is not None:
                    record.last[out.index] = out
                if out.error is not None:    # the instance ended the whole request: its client gets the error
                    self._forget(out.parent_id)
                    batches.setdefault(entry[0], []).append((entry[1], RequestFailedError(out.error), out.parent_id))
                    continue
                if out.finished:
                    self._unfinished[out.parent_id] -= 1
                    if self._unfinished[out.parent_id] == 0:
                        self._forget(out.parent_id)
                batches.setdefault(entry[0], []).append((entry[1], out, out.parent_id))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(put_all, items)
            except RuntimeError:       # the client's event loop is closed: nobody is listening
                for _, _, rid in items:
                    self.abort(rid)

    def _fail_everything(self, error: BaseException) -> None:
        with self._lock:
            sinks = list(self._sinks.values())
            self._sinks.clear()
            self._unfinished.clear()
            self._where.clear()
        for loop, sink in sinks:
            try:
                loop.call_soon_threadsafe(sink.put_nowait, error)
            except RuntimeError:
                pass

