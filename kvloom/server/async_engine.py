"""Runs the engine loop in one background thread and feeds per-request asyncio queues.

The HTTP side never touches the engine directly: it posts commands (add,
abort) that the loop thread applies between steps, and reads outputs from a
queue per request. The loop sleeps when there is no work.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass

from kvloom.engine.engine import Engine
from kvloom.engine.outputs import RequestOutput
from kvloom.errors import KvloomError
from kvloom.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(KvloomError):
    """The engine loop stopped on an internal error; the server must be restarted."""


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival_time: float
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    accepted: Future
    session_id: str | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _CloseSession:
    session_id: str
    done: Future


class AsyncEngine:
    """Thread-owning wrapper: `async for out in engine.generate(...)`."""

    def __init__(self, engine: Engine, on_step=None):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._unfinished: dict[str, int] = {}   # request id -> samples (of n) still running
        self._on_step = on_step            # called in the loop thread after each step (metrics)
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvloom-engine", daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(None)  # wake the loop
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    # ---- requests ------------------------------------------------------------------------

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
                       session_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the outputs of the request's n samples until all finish; aborts it if the consumer stops early."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        accepted: Future = Future()
        self._commands.put(_Add(request_id, prompt, params, time.time(), sink, loop, accepted, session_id))
        await asyncio.wrap_future(accepted)  # raises the engine's validation error, if any
        remaining = params.n
        try:
            while remaining:
                item = await sink.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item.finished
                yield item
        finally:
            if remaining:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    async def close_session(self, session_id: str) -> bool:
        done: Future = Future()
        self._commands.put(_CloseSession(session_id, done))
        return await asyncio.wrap_future(done)

    # ---- the loop thread -----------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                block = not engine.has_unfinished()
                self._apply_commands(block)
                if not engine.has_unfinished():
                    continue
                outputs = engine.step()
                self._deliver_outputs(outputs)
                if self._on_step is not None:
                    self._on_step(engine, outputs)
        except BaseException as e:  # anything here is a bug: fail every request loudly, never hang them
            log.exception("engine loop died")
            self._dead = e
            for rid in list(self._sinks):
                self._deliver(rid, EngineDeadError(f"the engine loop has stopped: {e}"), done=True)

    def _apply_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while cmd is not None:
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_request(cmd.prompt, cmd.params, cmd.request_id, cmd.arrival_time,
                                            cmd.session_id)
                except Exception as e:
                    cmd.accepted.set_exception(e)
                else:
                    self._sinks[cmd.request_id] = (cmd.loop, cmd.sink)
                    self._unfinished[cmd.request_id] = cmd.params.n
                    cmd.accepted.set_result(True)
            elif isinstance(cmd, _CloseSession):
                cmd.done.set_result(self.engine.close_session(cmd.session_id))
            elif isinstance(cmd, _Abort):
                if self.engine.abort_request(cmd.request_id):
                    self._sinks.pop(cmd.request_id, None)
                    self._unfinished.pop(cmd.request_id, None)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver_outputs(self, outputs) -> None:
        """Hand a step's outputs to their queues with one wake-up per event loop, not one per request:
        every cross-thread call costs the loop a wake-up and both threads a GIL hand-over."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            rid = out.parent_id
            done = False
            if out.finished and rid in self._unfinished:
                self._unfinished[rid] -= 1
                done = self._unfinished[rid] == 0
                if done:
                    del self._unfinished[rid]
            entry = self._sinks.pop(rid, None) if done else self._sinks.get(rid)
            if entry is not None:
                batches.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the clients' event loop is closed: nobody is listening
                for _, out in items:
                    self.engine.abort_request(out.parent_id)

    def _deliver(self, request_id: str, item, done: bool) -> None:
        entry = self._sinks.pop(request_id, None) if done else self._sinks.get(request_id)
        if entry is None:
            return
        loop, sink = entry
        try:
            loop.call_soon_threadsafe(sink.put_nowait, item)
        except RuntimeError:  # the client's event loop is closed: nobody is listening
            self.engine.abort_request(request_id)


def _put_all(items: list) -> None:
    for sink, item in items:
        sink.put_nowait(item)
