"""One engine instance of a cluster: an Engine with its own step loop, driven by remote calls.

`EngineWorker` is a plain class (usable, and tested, without Ray); `EngineActor` is the same class as a
Ray actor. The engine is built inside the worker from an EngineConfig (with its own torch thread count),
a background thread runs `engine.step()` while there is work, and every remote call takes the engine
lock between steps. Outputs pile up in an outbox that `poll()` hands over a step's batch at a time: one
remote call per poll, never one per token.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time

import torch

from kvloom.cluster.load import LoadReport, load_report
from kvloom.cluster.wire import from_wire, to_wire
from kvloom.config import EngineConfig
from kvloom.engine.openmp_pool import leave_compute_to_engine_thread
from kvloom.engine.outputs import RequestOutput
from kvloom.engine.snapshot import RequestSnapshot
from kvloom.sampling_params import SamplingParams
from kvloom.server.heap import freeze_startup_heap


class EngineWorker:
    def __init__(self, config: EngineConfig, instance_id: int = 0, idle_wait: float = 0.05):
        from kvloom.engine.engine import Engine   # built here: inside the actor's process
        from kvloom.server.metrics import ServerMetrics

        self.instance_id = instance_id
        self.config = config
        self.engine = Engine(config)
        self.metrics = ServerMetrics()            # this instance's figures, for the front's dashboard
        self._lock = _Turnstile()                  # held by each step and by every call between steps
        self._work = threading.Event()             # set when a call may have given the loop work
        self._stop = threading.Event()
        self._outbox: list[RequestOutput] = []
        self._error: BaseException | None = None
        self._idle_wait = idle_wait
        self._min_step_seconds = 0.0                # set_pace: emulate a slower instance
        self.num_steps = 0
        self.num_add_calls = 0
        self._staged: dict[str, list[int]] = {}      # request id -> blocks pre-copied here (migration)
        self._thread = threading.Thread(target=self._run, name=f"kvloom-instance-{instance_id}", daemon=True)
        self._thread.start()

    # ---- the step loop -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    busy = self.engine.has_unfinished()
                    if busy:
                        outputs = self.engine.step()
                        self.num_steps += 1
                        self.metrics.observe_engine(self.engine, outputs)
                        self._outbox.extend(outputs)
                if not busy:
                    self._work.wait(self._idle_wait)
                    self._work.clear()
                else:
                    if self._min_step_seconds:
                        time.sleep(self._min_step_seconds)
                    self._lock.yield_to_callers()
        except BaseException as e:     # a bug: report it on every later call, never hang clients
            self._error = e

    def set_pace(self, min_step_seconds: float) -> None:
        """Wait this long after each step (0: run flat out). Emulates a slower or busier instance, so a
        migration or scheduling test can count on a request still running while it acts on it."""
        self._min_step_seconds = max(0.0, float(min_step_seconds))

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"instance {self.instance_id}'s step loop died: {self._error!r}")

    # ---- requests ------------------------------------------------------------------------

    def ready(self) -> bool:
        return True

    def reset(self) -> LoadReport:
        """Drop every request and staged block (the front resumed them elsewhere while this instance was
        unreachable) and report the load: how an instance rejoins the cluster."""
        self._check()
        with self._lock:
            for rid in list(self.engine._family):
                self.engine.abort_request(rid)
            for blocks in self._staged.values():
                self.engine.pool.free(blocks)
            self._staged.clear()
            self._outbox = []
            return self._load()

    def add_request(self, prompt: list[int] | str, params: SamplingParams, request_id: str,
                    arrival_time: float | None = None, session_id: str | None = None,
                    cache_salt: str | None = None, priority: int = 0, lora: str | None = None) -> str:
        with self._lock:
            self.num_add_calls += 1    # counted even when refused: the front's ledger counts calls
            self._check()
            rid = self.engine.add_request(prompt, params, request_id, arrival_time, session_id, cache_salt,
                                          priority, lora)
        self._work.set()
        return rid

    def abort(self, request_id: str) -> bool:
        with self._lock:
            return self.engine.abort_request(request_id)

    def close_session(self, session_id: str) -> bool:
        with self._lock:
            return self.engine.close_session(session_id)

    def poll(self) -> tuple[list[RequestOutput], LoadReport]:
        """The outputs of the steps since the last poll (in step order), and the load now."""
        self._check()
        with self._lock:
            outputs, self._outbox = self._outbox, []
            return outputs, self._load()

    def has(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self.engine._family

    # ---- load and prefixes -----------------------------------------------------------------

    def load(self) -> LoadReport:
        with self._lock:
            return self._load()

    def _load(self) -> LoadReport:
        e = self.engine
        return load_report(self.instance_id, e.scheduler, e.pool, e.config.block_size, e._family,
                           alive=self._error is None, num_add_calls=self.num_add_calls)

    def cached_prefix_blocks(self, token_ids: list[int], cache_salt: str | None = None,
                             lora: str | None = None) -> int:
        """How many leading full blocks of this token sequence this instance holds KV for (content keys)."""
        e = self.engine
        if e.prefix_cache is None:
            return 0
        keys = e.prefix_cache.keys(list(token_ids), e.prefix_salt(cache_salt, lora))
        with self._lock:
            n = 0
            for k in keys:
                if e.pool.lookup(k) is None:
                    break
                n += 1
            return n

    # ---- migration -----------------------------------------------------------------------

    def export_request(self, request_id: str, with_kv: bool = True) -> RequestSnapshot:
        """Stop the request here and take it out (with its KV). Its outputs of earlier steps stay in the
        outbox: poll() once more to have the whole stream up to the snapshot."""
        self._check()
        with self._lock:
            return self.engine.export_request(request_id, with_kv=with_kv)

    def export_for_migration(self, request_id: str, with_kv: bool = True):
        """export_request for a mover: (snapshot, True, KV bytes), or (None, False, 0) when the request is not
        here (it finished or was aborted). Call with .options(num_returns=3): the mover reads the flag and
        passes the snapshot's object ref on to the destination, so the KV never goes through the mover."""
        self._check()
        with self._lock:
            if request_id not in self.engine._family:
                return None, False, 0
            snap = self.engine.export_request(request_id, with_kv=with_kv)
        return _wired(snap), True, 0 if snap.kv is None else snap.kv.nbytes

    # Multi-stage pre-copy (float KV, single-sample requests): the full blocks of a running request are
    # copied while it keeps decoding (a full computed block never changes), then the final stop ships
    # only the blocks filled since.

    def precopy_blocks(self, request_id: str, start: int) -> tuple[list[int] | None, dict | None]:
        """(source block ids, their K/V) of the request's full computed blocks from `start` on, or
        (None, None) when pre-copy does not apply (not here, a family of n > 1, int8 KV)."""
        e = self.engine
        with self._lock:
            family = e._family.get(request_id)
            req = e.scheduler.requests.get(request_id)
            if family is None or len(family) != 1 or req is None or e.runner.kv.layout.get("kind") != "float":
                return None, None
            full = req.num_computed_tokens // e.config.block_size
            ids = list(req.block_ids[start:full])
            return ids, (to_wire(e.runner.kv.read_blocks(ids)) if ids else None)

    def stage_blocks(self, request_id: str, tensors: dict | None) -> int:
        """Hold pre-copied blocks for a request about to arrive. Returns the bytes staged by this call."""
        staged = self._staged.setdefault(request_id, [])
        if tensors is None:
            return 0
        tensors = from_wire(tensors)
        n = tensors["k"].shape[1]
        with self._lock:
            blocks = self.engine.pool.allocate(n)
            if blocks is None:
                raise RuntimeError(f"no room to stage {n} blocks")
            self.engine.runner.kv.write_blocks(blocks, tensors)
            staged += blocks
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def drop_staged(self, request_id: str) -> None:
        with self._lock:
            blocks = self._staged.pop(request_id, [])
            if blocks:
                self.engine.pool.free(blocks)

    def export_after_precopy(self, request_id: str, precopied: list[int], with_kv: bool = True):
        """The final stop: (snapshot without the first k blocks' KV, True, k, the KV bytes it carries), k = how
        many of the pre-copied source blocks are still the request's leading blocks (0 after a preemption).
        (None, False, 0, 0) when the request is not here. Call with .options(num_returns=4)."""
        e = self.engine
        with self._lock:
            if request_id not in e._family:
                return None, False, 0, 0
            req = e.scheduler.requests.get(request_id)
            k = len(precopied) if req is not None and req.block_ids[:len(precopied)] == precopied else 0
            snap = e.export_request(request_id, with_kv=with_kv)
        if snap.kv is None or not with_kv or len(snap.samples) != 1:
            return _wired(snap), True, 0, 0 if snap.kv is None else snap.kv.nbytes
        tail = {name: t[:, k:].clone() for name, t in snap.kv.tensors.items()}
        kv = dataclasses.replace(snap.kv, tensors=tail, num_blocks=snap.kv.num_blocks - k)
        return _wired(dataclasses.replace(snap, kv=kv)), True, k, kv.nbytes

    def import_with_staged(self, snap: RequestSnapshot, k: int) -> str:
        """import_request of a snapshot whose first k blocks were pre-copied here (stage_blocks)."""
        self._check()
        snap = _unwired(snap)
        with self._lock:
            staged = self._staged.pop(snap.request_id, [])
            try:
                if k:
                    head = self.engine.runner.kv.read_blocks(staged[:k])
                    tensors = {name: torch.cat([head[name], t], dim=1) for name, t in snap.kv.tensors.items()}
                    snap = dataclasses.replace(snap, kv=dataclasses.replace(snap.kv, tensors=tensors,
                                                                            num_blocks=snap.kv.num_blocks + k))
            finally:
                if staged:
                    self.engine.pool.free(staged)
            rid = self.engine.import_request(snap)
        self._work.set()
        return rid

    def import_request(self, snap: RequestSnapshot) -> str:
        self._check()
        snap = _unwired(snap)
        with self._lock:
            rid = self.engine.import_request(snap)
        self._work.set()
        return rid

    def resume_request(self, request_id: str, prompt, params: SamplingParams, outputs: dict,
                       arrival_time: float | None, session_id: str | None, cache_salt: str | None,
                       priority: int, lora: str | None = None) -> str:
        """Engine.resume_request: continue a request of a lost instance from its streamed tokens."""
        self._check()
        with self._lock:
            rid = self.engine.resume_request(request_id, prompt, params, outputs, arrival_time, session_id,
                                             cache_salt, priority, lora)
        self._work.set()
        return rid

    # ---- introspection ---------------------------------------------------------------------

    def dashboard_stats(self) -> dict:
        """This instance's dashboard figures (ServerMetrics.snapshot, fed after every step)."""
        with self._lock:
            return self.metrics.snapshot(str(self.instance_id))

    def info(self) -> dict:
        import torch

        try:
            import ray
            ctx = ray.get_runtime_context()
            node_id, actor_id = ctx.get_node_id(), ctx.get_actor_id()
        except Exception:   # not in a Ray worker
            node_id = actor_id = None
        with self._lock:
            running = [r.request_id for r in self.engine.scheduler.running]
            waiting = [r.request_id for r in self.engine.scheduler.waiting]
        return {"instance_id": self.instance_id, "node_id": node_id, "actor_id": actor_id, "pid": os.getpid(),
                "torch_threads": torch.get_num_threads(), "threads": threading.active_count(),
                "frozen_objects": gc.get_freeze_count(),
                "running": running, "waiting": waiting, "num_steps": self.num_steps,
                "num_blocks": self.engine.pool.num_blocks, "block_size": self.engine.config.block_size,
                "alive": self._error is None and self._thread.is_alive()}

    def shutdown(self) -> None:
        self._stop.set()
        self._work.set()
        self._thread.join(5)


class _Turnstile:
    """The engine lock, fair to remote calls: between steps the step loop waits until every call already
    waiting has had its turn. A plain Lock let the loop take it back step after step (a migration's
    export measured waiting 5-12 steps)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self._waiting = 0

    def __enter__(self):
        with self._cv:
            self._waiting += 1
        self._lock.acquire()
        with self._cv:
            self._waiting -= 1
            self._cv.notify_all()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def yield_to_callers(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._waiting == 0, timeout=1.0)


def _wired(snap: RequestSnapshot | None) -> RequestSnapshot | None:
    """The snapshot with its KV as numpy arrays, for Ray's zero-copy object store (cluster/wire.py)."""
    if snap is None or snap.kv is None:
        return snap
    return dataclasses.replace(snap, kv=dataclasses.replace(snap.kv, tensors=to_wire(snap.kv.tensors)))


def _unwired(snap: RequestSnapshot) -> RequestSnapshot:
    if snap.kv is None:
        return snap
    return dataclasses.replace(snap, kv=dataclasses.replace(snap.kv, tensors=from_wire(snap.kv.tensors)))


class _ActorWorker(EngineWorker):
    """EngineWorker with a process of its own: the thread Ray calls it on built the engine, and leaves the
    compute to the step thread (engine/openmp_pool.py)."""

    def __init__(self, config: EngineConfig, instance_id: int = 0, idle_wait: float = 0.05):
        super().__init__(config, instance_id, idle_wait)
        leave_compute_to_engine_thread()
        freeze_startup_heap()   # as `kvloom serve` does (server/heap.py): full collections skip the model


def engine_actor_class(num_cpus: float = 1, max_restarts: int = -1):
    """EngineWorker as a Ray actor class, taking num_cpus of the cluster's CPUs. Ray restarts a dead one
    (max_restarts, -1: always) with a fresh engine; calls in flight when it died fail (no retries): the
    front resumes their requests elsewhere."""
    import ray
    return ray.remote(num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0)(_ActorWorker)
