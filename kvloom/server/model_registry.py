"""The models a multi-model server serves: each loaded on demand (its own engine, engine thread and app), at
most `max_loaded` at once (the least recently used idle one makes room), unloaded after `idle_seconds`
without a request (llama.cpp's router mode, Ollama's keep-alive).

Every state change happens on the event loop; only the blocking load and shutdown run in worker threads, so
requests for other models keep flowing while one loads. A model with requests in flight is never unloaded.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("kvloom.serve")


@dataclass
class LoadedModel:
    app: object            # the model's own ASGI app (server/app.py build_app)
    async_engine: object   # its AsyncEngine (one engine thread)
    metrics: object        # its ServerMetrics


@dataclass
class _Slot:
    name: str
    loaded: LoadedModel | None = None
    loading: asyncio.Future | None = None
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ModelRegistry:
    def __init__(self, names: list[str], load: Callable[[str], LoadedModel], max_loaded: int = 0,
                 idle_seconds: float = 0.0):
        self.slots = {n: _Slot(n) for n in names}
        self.default = names[0]
        self._load = load
        self.max_loaded = max_loaded or len(names)
        self.idle_seconds = idle_seconds
        self._room = asyncio.Condition()
        self._reserved: set[str] = set()   # models admitted under max_loaded whose load has not finished
        self.loads = 0
        self.unloads = 0

    def loaded(self) -> dict[str, LoadedModel]:
        return {n: s.loaded for n, s in self.slots.items() if s.loaded is not None}

    async def acquire(self, name: str) -> LoadedModel:
        """The model, loaded; counted in flight until release(name)."""
        slot = self.slots[name]
        slot.in_flight += 1
        slot.last_used = time.monotonic()
        try:
            while slot.loaded is None:
                if slot.loading is None:
                    slot.loading = asyncio.ensure_future(self._load_into(slot))
                await asyncio.shield(slot.loading)
            return slot.loaded
        except BaseException:
            self.release(name)
            raise

    def release(self, name: str) -> None:
        slot = self.slots[name]
        slot.in_flight -= 1
        slot.last_used = time.monotonic()
        if slot.in_flight == 0:
            asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self._room:
            self._room.notify_all()

    async def _load_into(self, slot: _Slot) -> None:
        try:
            async with self._room:
                while len(self.loaded()) + len(self._reserved) >= self.max_loaded:
                    victim = self._evictable(exclude=slot.name)
                    if victim is None:   # every loaded model is busy: wait for one to go idle
                        await self._room.wait()
                        continue
                    log.info("model %s: unloaded to make room for %s (--max-loaded-models %d)", victim.name,
                             slot.name, self.max_loaded)
                    await self._unload(victim)
                self._reserved.add(slot.name)
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            slot.loaded = await loop.run_in_executor(None, self._load, slot.name)
            self.loads += 1
            log.info("model %s: loaded in %.1f s", slot.name, time.perf_counter() - started)
        finally:
            slot.loading = None
            self._reserved.discard(slot.name)

    def _evictable(self, exclude: str) -> _Slot | None:
        idle = [s for s in self.slots.values() if s.loaded is not None and s.in_flight == 0 and s.name != exclude]
        return min(idle, key=lambda s: s.last_used) if idle else None

    async def _unload(self, slot: _Slot) -> None:
        loaded, slot.loaded = slot.loaded, None
        await asyncio.get_running_loop().run_in_executor(None, loaded.async_engine.shutdown)
        self.unloads += 1

    async def reap_idle(self, period: float = 0.5) -> None:
        """Unload models idle for idle_seconds; runs for the server's life."""
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for slot in list(self.slots.values()):
                if slot.loaded is not None and slot.in_flight == 0 and now - slot.last_used >= self.idle_seconds:
                    log.info("model %s: unloaded after %.0f s idle (--model-idle-seconds)", slot.name,
                             now - slot.last_used)
                    await self._unload(slot)

    async def close(self) -> None:
        for slot in self.slots.values():
            if slot.loaded is not None:
                await self._unload(slot)
