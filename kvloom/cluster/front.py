"""The cluster front: AsyncEngine's interface over N engine actors, with a global scheduler and migration.

    generate(prompt, params, request_id, session_id) -> async iterator of RequestOutput
    abort(request_id), is_alive, start(), shutdown(), migrate(request_id, to=None)

One poller thread polls every actor in turn (one remote call per actor per round, bringing a batch of
step outputs and the instance's load) and hands the outputs to the requests' asyncio queues, one wake-up
per event loop per round. New requests go where the dispatch policy says (kvloom/cluster/dispatch.py),
over the latest load reports adjusted by what was dispatched since.

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
import threading
import time
import uuid
from collections.abc import AsyncIterator

from kvloom.cluster.dispatch import make_policy
from kvloom.cluster.engine_actor import LoadReport, engine_actor_class
from kvloom.config import EngineConfig
from kvloom.engine.outputs import RequestOutput
from kvloom.errors import InvalidRequestError, KvloomError
from kvloom.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class ClusterDeadError(KvloomError):
    """The cluster front has shut down or its poller died."""


class ClusterEngine:
    def __init__(self, config: EngineConfig, num_instances: int = 2, policy: str = "llumnix",
                 threads_per_instance: int = 1, cpus_per_instance: float = 1, ray_init: dict | None = None,
                 poll_interval: float = 0.005):
        if num_instances < 1:
            raise InvalidRequestError("a cluster needs at least one instance", field="instances")
        self.config = dataclasses.replace(config, num_threads=threads_per_instance or config.num_threads)
        self.num_instances = num_instances
        self.policy_name = policy
        self._policy = make_policy(policy)
        self._cpus = cpus_per_instance
        self._ray_init = ray_init
        self._poll_interval = poll_interval
        self.actors: list = []
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
        cls = engine_actor_class(self._cpus)
        self.actors = [cls.remote(self.config, i) for i in range(self.num_instances)]
        ray.get([a.ready.remote() for a in self.actors])
        self._loads = ray.get([a.load.remote() for a in self.actors])
        self._poll_locks = [threading.Lock() for _ in self.actors]
        self._sent = [[] for _ in self.actors]
        self._num_sent = [0] * len(self.actors)
        self._started = True
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        import ray

        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        self._fail_everything(ClusterDeadError("the cluster has shut down"))
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception as e:  # noqa: BLE001 - shutting down: an actor already gone is fine, but say so
                log.info("cluster shutdown: actor %s was already gone (%s)", a, e)
        self.actors = []

    @property
    def is_alive(self) -> bool:
        return self._started and self._thread.is_alive() and self._dead is None and not self._stop.is_set()

    # ---- requests ------------------------------------------------------------------------

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
                       session_id: str | None = None, cache_salt: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields the outputs of the request's n samples until all finish; aborts it if the consumer stops early."""
        if not self.is_alive:
            raise ClusterDeadError("the cluster is not running")
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._sinks:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", field="request_id")
            self._sinks[request_id] = (loop, sink)
            self._unfinished[request_id] = params.n
        remaining = params.n
        try:
            target = await self._choose(prompt, request_id, cache_salt)
            await self.actors[target].add_request.remote(prompt, params, request_id, time.time(), session_id,
                                                         cache_salt, priority)
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

    async def _choose(self, prompt, request_id: str, cache_salt: str | None = None) -> int:
        """The policy's instance for a new request, counted in that instance's load at once (so concurrent
        arrivals see each other)."""
        prefix = None
        if self.policy_name == "llumnix" and not isinstance(prompt, str):
            counts = await asyncio.gather(*[a.cached_prefix_blocks.remote(prompt, cache_salt) for a in self.actors])
            prefix = dict(enumerate(counts))
        with self._lock:
            target = self._policy(self._effective_loads(), prefix_blocks=prefix, prompt_len=len(prompt))
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

    def where(self, request_id: str) -> int | None:
        with self._lock:
            return self._where.get(request_id)

    # ---- migration -----------------------------------------------------------------------

    def migrate_sync(self, request_id: str, to: int | None = None, with_kv: bool = True,
                     precopy_rounds: int = 0) -> bool:
        """Move a running request to instance `to` (None: the freest other one). False when the request is
        no longer running anywhere (finished, aborted, or already moving).

        precopy_rounds > 0: multi-stage pre-copy first (float KV, n = 1): up to that many rounds copy the
        request's newly full blocks to the destination while it keeps decoding; the final stop then ships
        only the blocks filled since. self.last_migration tells how many blocks went in each phase."""
        import ray

        with self._lock:
            src = self._where.get(request_id)
            if src is None or request_id in self._migrating:
                return False
            if to is None:
                others = [l for l in self._effective_loads() if l.instance_id != src and l.alive]
                if not others:
                    return False
                to = max(others, key=lambda l: (l.freeness, -l.instance_id)).instance_id
            if to == src:
                return False
            self._migrating[request_id] = False
        precopied: list[int] = []
        try:
            if precopy_rounds and with_kv:
                precopied = self._precopy(request_id, src, to, precopy_rounds)
            with self._poll_locks[src]:
                if precopied:
                    snap, exported, skip = self.actors[src].export_after_precopy.options(num_returns=3).remote(
                        request_id, precopied, with_kv)
                    skip = ray.get(skip)
                else:
                    snap, exported = self.actors[src].export_for_migration.options(num_returns=2).remote(
                        request_id, with_kv)
                    skip = 0
                exported = ray.get(exported)
                # The outputs of the source's steps before the export (and, if it finished, its last).
                outputs, load = ray.get(self.actors[src].poll.remote())
                self._deliver(outputs, src, load)
                if not exported:
                    if precopied:
                        ray.get(self.actors[to].drop_staged.remote(request_id))
                    return False
                if precopied:
                    ok = self._import_staged(snap, skip, to)
                    self.last_migration = {"precopied_blocks": len(precopied), "reused_blocks": skip}
                    if not ok:       # the snapshot lacks the pre-copied blocks: recompute at the source
                        ray.get(self.actors[src].import_request.remote(ray.get(snap).without_kv()))
                        to = src
                else:
                    ok = self._import(snap, to)
                    self.last_migration = {"precopied_blocks": 0, "reused_blocks": 0}
                    if not ok:
                        self._import(snap, src)
                        to = src
                with self._lock:
                    aborted = self._migrating.pop(request_id)
                    if request_id in self._sinks:
                        self._where[request_id] = to
                if aborted:
                    self.actors[to].abort.remote(request_id)
                self.num_migrations += ok
                return ok
        finally:
            with self._lock:
                self._migrating.pop(request_id, None)

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

    def _precopy(self, request_id: str, src: int, to: int, rounds: int) -> list[int]:
        """Copy full blocks source -> destination (straight, through the object store) while the request
        runs on. Returns the source block ids copied ([]: pre-copy does not apply, or nothing to copy)."""
        import ray

        copied: list[int] = []
        try:
            for _ in range(rounds):
                ids_ref, kv_ref = self.actors[src].precopy_blocks.options(num_returns=2).remote(
                    request_id, len(copied))
                ids = ray.get(ids_ref)
                if not ids:
                    break
                ray.get(self.actors[to].stage_blocks.remote(request_id, kv_ref))
                copied += ids
                if len(ids) <= 1:        # converged: the final stop has at most a block or two left
                    break
        except Exception as e:
            log.warning("pre-copy of %s failed (%s); stop-and-copy instead", request_id, e)
            ray.get(self.actors[to].drop_staged.remote(request_id))
            return []
        return copied

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
                      precopy_rounds: int = 0) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self.migrate_sync, request_id, to, with_kv,
                                                                precopy_rounds)

    # ---- the poller ----------------------------------------------------------------------

    def loads(self) -> list[LoadReport]:
        with self._lock:
            return self._effective_loads()

    def info(self) -> list[dict]:
        import ray
        return ray.get([a.info.remote() for a in self.actors])

    def _poll_loop(self) -> None:
        import ray

        try:
            while not self._stop.is_set():
                got = 0
                for i, actor in enumerate(self.actors):
                    with self._poll_locks[i]:
                        outputs, load = ray.get(actor.poll.remote())
                        self._deliver(outputs, i, load)
                    got += len(outputs)
                if not got:
                    time.sleep(self._poll_interval)
        except BaseException as e:
            if not self._stop.is_set():
                log.exception("cluster poller died")
                self._dead = e
                self._fail_everything(ClusterDeadError(f"the cluster poller stopped: {e!r}"))

    def _deliver(self, outputs: list[RequestOutput], instance: int, load: LoadReport) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            self._loads[instance] = load
            self._sent[instance] = [e for e in self._sent[instance] if e[0] >= load.num_add_calls]
            for out in outputs:
                entry = self._sinks.get(out.parent_id)
                if entry is None:
                    continue
                if out.finished:
                    self._unfinished[out.parent_id] -= 1
                    if self._unfinished[out.parent_id] == 0:
                        self._forget(out.parent_id)
                batches.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:       # the client's event loop is closed: nobody is listening
                for _, out in items:
                    self.abort(out.parent_id)

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


def _put_all(items: list) -> None:
    for sink, item in items:
        sink.put_nowait(item)
