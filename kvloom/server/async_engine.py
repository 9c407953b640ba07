"""Runs the engine loop in one background thread and feeds per-request asyncio queues.

The HTTP side never touches the engine directly: it posts commands (add,
abort) that the loop thread applies between steps, and reads outputs from a
queue per request. The loop sleeps when there is no work. Searches that act
between steps (beam search, guided search: scaling/search.py) run here as
programs the loop advances after each step with their outputs.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from kvloom.engine.engine import Engine
from kvloom.engine.outputs import RequestOutput
from kvloom.errors import KvloomError, RequestFailedError
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
    cache_salt: str | None = None
    priority: int = 0
    lora: str | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _EngineCall:
    """Run fn(engine) on the loop thread, between steps (adapters loaded or unloaded...); its result or error
    answers `done`."""
    fn: object
    done: Future


@dataclass
class _Search:
    """A search program (scaling/search.py: beam search, guided search) run on the loop thread: started when
    the command is applied, advanced after every step with that step's outputs of its requests (it may fork,
    abort, pause and add samples before the next step); its result or error answers `done`."""
    program: object
    done: Future


@dataclass
class _CancelSearch:
    program: object


class AsyncEngine:
    """Thread-owning wrapper: `async for out in engine.generate(...)`."""

    def __init__(self, engine: Engine, on_step=None):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._unfinished: dict[str, int] = {}   # request id -> samples (of n) still running
        self._searches: list[_Search] = []     # running search programs, advanced after each step
        self._on_step = on_step            # called in the loop thread after each step (metrics)
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        # Held to submit a command and to declare the loop stopped: no command slips in after the
        # final drain, so every command gets an answer.
        self._submit_lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kvloom-engine", daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(None)  # wake the loop
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._fail_everything(EngineDeadError("the engine has shut down"))

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def _dead_error(self) -> EngineDeadError:
        if self._dead is not None:
            return EngineDeadError(f"the engine loop has stopped on an internal error ({self._dead!r}); "
                                   "restart the server")
        return EngineDeadError("the engine has shut down")

    def _submit(self, cmd) -> None:
        """Queue a command for the loop thread; once the loop has stopped, fail it at once instead."""
        with self._submit_lock:
            if not self._stopped:
                self._commands.put(cmd)
                return
        _reject(cmd, self._dead_error())

    # ---- requests ------------------------------------------------------------------------

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
                       session_id: str | None = None, cache_salt: str | None = None,
                       priority: int = 0, lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the outputs of the request's n samples until all finish; aborts it if the consumer stops early."""
        if self._stopped:
            raise self._dead_error()
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        accepted: Future = Future()
        self._submit(_Add(request_id, prompt, params, time.time(), sink, loop, accepted, session_id, cache_salt,
                          priority, lora))
        try:
            await asyncio.wrap_future(accepted)  # raises the engine's validation error, if any
        except asyncio.CancelledError:
            # The caller left while the add was on its way: the loop either skips the add (its future
            # is cancelled) or has applied it, and then this abort, queued after it, removes it.
            self.abort(request_id)
            raise
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
        self._submit(_Abort(request_id))

    async def call(self, fn):
        """fn(engine) on the loop thread between steps; returns its result (raises its error)."""
        if self._stopped:
            raise self._dead_error()
        done: Future = Future()
        self._submit(_EngineCall(fn, done))
        return await asyncio.wrap_future(done)

    async def run_search(self, program):
        """Run a search program between the engine's steps, batched with every other request; returns its
        SearchResult (raises its error). Cancelled (the client left), every request of the search is aborted."""
        if self._stopped:
            raise self._dead_error()
        done: Future = Future()
        self._submit(_Search(program, done))
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            self._submit(_CancelSearch(program))   # a no-op once it has ended (or if it never started)
            raise

    async def close_session(self, session_id: str) -> bool:
        return await self.call(lambda engine: engine.close_session(session_id))

    # ---- the loop thread -----------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        trainer = getattr(engine, "trainer", None)
        try:
            while not self._stop.is_set():
                training = trainer is not None and trainer.active
                block = not engine.has_unfinished() and not training
                changed = self._apply_commands(block)
                if not engine.has_unfinished():
                    if self._searches:   # a search waiting on nothing would wait forever: a bug, ended loudly
                        for entry in list(self._searches):
                            self._end_search(entry, RuntimeError("the search stalled with none of its requests "
                                                                 "left in the engine"))
                    if changed and self._on_step is not None:
                        # Aborts emptied the engine between steps: no step follows to refresh the gauges.
                        self._on_step(engine, [])
                    if training:
                        trainer.run_slice(0.0)   # idle: a slice of fine-tuning, then look for requests again
                    continue
                started = time.perf_counter()
                outputs = engine.step()
                if self._searches:
                    self._advance_searches(outputs)
                self._deliver_outputs(outputs)
                if self._on_step is not None:
                    self._on_step(engine, outputs)
                if engine.faults is not None:
                    engine.faults.fire("loop")   # an injected death of this thread (engine/faults.py)
                if training:   # fine-tuning fills what the step left of its time target (finetune/cotrainer.py)
                    trainer.run_slice(time.perf_counter() - started)
        except BaseException as e:  # anything here is a bug: fail every request loudly, never hang them
            log.exception("engine loop died")
            self._dead = e
        self._fail_everything(self._dead_error())

    def _fail_everything(self, error: EngineDeadError) -> None:
        """The loop has stopped: fail the requests it was running and every command still queued;
        commands submitted from now on fail in _submit."""
        with self._submit_lock:
            self._stopped = True
        for rid in list(self._sinks):
            entry = self._sinks.pop(rid)
            try:
                entry[0].call_soon_threadsafe(entry[1].put_nowait, error)
            except RuntimeError:  # the client's event loop is closed: nobody is listening
                pass
        self._unfinished.clear()
        for entry in self._searches:
            _resolve(entry.done, error=error)
        self._searches.clear()
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            _reject(cmd, error)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands; True if one changed the engine's state."""
        changed = False
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return changed
        while cmd is not None:
            if isinstance(cmd, _Add):
                # A cancelled future: its caller is gone, so the request is not added at all.
                if cmd.accepted.set_running_or_notify_cancel():
                    try:
                        self.engine.add_request(cmd.prompt, cmd.params, cmd.request_id, cmd.arrival_time,
                                                cmd.session_id, cmd.cache_salt, cmd.priority, cmd.lora)
                    except Exception as e:
                        cmd.accepted.set_exception(e)
                    else:
                        self._sinks[cmd.request_id] = (cmd.loop, cmd.sink)
                        self._unfinished[cmd.request_id] = cmd.params.n
                        cmd.accepted.set_result(True)
                        changed = True
            elif isinstance(cmd, _EngineCall):
                try:
                    result = cmd.fn(self.engine)
                except Exception as e:
                    _resolve(cmd.done, error=e)
                else:
                    _resolve(cmd.done, result)
                    changed = True   # e.g. a session's KV released: the gauges are refreshed
            elif isinstance(cmd, _Search):
                if cmd.done.set_running_or_notify_cancel():   # (cancelled: its caller is gone)
                    self._searches.append(cmd)
                    try:
                        cmd.program.start(self.engine)
                    except Exception as e:
                        self._end_search(cmd, e)
                    changed = True
            elif isinstance(cmd, _CancelSearch):
                entry = next((e for e in self._searches if e.program is cmd.program), None)
                if entry is not None:
                    self._end_search(entry, asyncio.CancelledError())
                    changed = True
            elif isinstance(cmd, _Abort):
                # After the engine is done with a request (finished, or never added) this is a no-op;
                # any of its outputs still on their way find no sink and are dropped.
                if self.engine.abort_request(cmd.request_id):
                    changed = True
                self._sinks.pop(cmd.request_id, None)
                self._unfinished.pop(cmd.request_id, None)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return changed
        return changed

    def _advance_searches(self, outputs) -> None:
        for entry in list(self._searches):
            program = entry.program
            try:
                program.advance(self.engine, [o for o in outputs if program.owns(o.parent_id)])
            except Exception as e:
                self._end_search(entry, e)
                continue
            if program.done:
                self._end_search(entry)

    def _end_search(self, entry: _Search, error: BaseException | None = None) -> None:
        """Take a search out: whatever of it still runs is aborted (its blocks freed); answer its caller."""
        self._searches.remove(entry)
        entry.program.close(self.engine)
        if error is None:
            try:
                _resolve(entry.done, entry.program.result())
                return
            except Exception as e:
                error = e
        if not isinstance(error, (asyncio.CancelledError, KvloomError)):   # a bug, not the caller's doing
            log.error("search %s failed; its requests are aborted", type(entry.program).__name__, exc_info=error)
        _resolve(entry.done, error=error)

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
            if out.error is not None:    # the engine ended the whole request: its client gets the error
                self._unfinished.pop(rid, None)
                done = True
            entry = self._sinks.pop(rid, None) if done else self._sinks.get(rid)
            if entry is not None:
                batches.setdefault(entry[0], []).append(
                    (entry[1], RequestFailedError(out.error) if out.error is not None else out, rid))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(put_all, items)
            except RuntimeError:  # the clients' event loop is closed: nobody is listening
                for _, _, rid in items:
                    self.engine.abort_request(rid)
                    self._sinks.pop(rid, None)
                    self._unfinished.pop(rid, None)


def _resolve(fut: Future, result=None, error: BaseException | None = None) -> None:
    """Answer a command's future unless its caller has cancelled it (which must not kill the loop)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


def _reject(cmd, error: BaseException) -> None:
    if isinstance(cmd, _Add):
        _resolve(cmd.accepted, error=error)
    elif isinstance(cmd, (_EngineCall, _Search)):
        _resolve(cmd.done, error=error)


def put_all(items: list) -> None:
    """(sink, item, request id) triples, put in one call of the sinks' event loop."""
    for sink, item, _ in items:
        sink.put_nowait(item)
