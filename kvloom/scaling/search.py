"""Searches that act between engine steps (beam search, guided search) as programs over one Engine.

A SearchProgram adds its requests (start), reads every step's outputs of them (advance) and, before the next
step, may fork, abort, pause or add samples; close() aborts whatever of it still runs. Offline, run_searches
steps the engine itself; the server's AsyncEngine calls the same methods on its engine thread after each of
its steps (server/async_engine.py), so a search gives the same result offline and served, batched with any
other requests.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from kvloom.engine.engine import Engine
from kvloom.engine.outputs import RequestOutput
from kvloom.errors import RequestFailedError


@dataclass(frozen=True)
class Placement:
    """How a search's engine requests are placed: the tenant's cache salt, priority and LoRA adapter."""
    cache_salt: str | None = None
    priority: int = 0
    lora: str | None = None

    def add(self, engine: Engine, prompt, params, request_id: str) -> str:
        return engine.add_request(prompt, params, request_id=request_id, cache_salt=self.cache_salt,
                                  priority=self.priority, lora=self.lora)


@dataclass
class SearchResult:
    choices: list[RequestOutput]      # the returned hypotheses, best first (index = rank)
    extension: dict                   # the response's `kvloom` object
    tokens_drawn: int                 # every token the search drew, returned or not


class SearchProgram(ABC):
    done = False        # set by advance once the result is there

    @abstractmethod
    def start(self, engine: Engine) -> None:
        """Add the search's first requests (raises, changing nothing it does not close, on bad settings)."""

    @abstractmethod
    def owns(self, parent_id: str) -> bool:
        """Whether outputs of this engine request (its parent id) are the search's."""

    @abstractmethod
    def advance(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        """This step's outputs of the search's requests (possibly none); sets done when it has its result."""

    @abstractmethod
    def close(self, engine: Engine) -> None:
        """Abort every request of the search still in the engine (idempotent; also after a failed start)."""

    @abstractmethod
    def result(self) -> SearchResult: ...


def raise_failed(outputs: list[RequestOutput]) -> None:
    """A search cannot go on without one of its samples: the engine's error ends it."""
    for out in outputs:
        if out.error is not None:
            raise RequestFailedError(out.error)


def run_searches(engine: Engine, programs: list[SearchProgram]) -> list[SearchResult]:
    """Run the programs together (with whatever else the engine holds) until each is done."""
    started: list[SearchProgram] = []
    try:
        for p in programs:
            started.append(p)
            p.start(engine)
        while not all(p.done for p in programs):
            if not engine.has_unfinished():
                raise RuntimeError("a search is waiting with none of its requests left in the engine")
            outputs = engine.step()
            for p in programs:
                if not p.done:
                    p.advance(engine, [o for o in outputs if p.owns(o.parent_id)])
    finally:
        for p in started:
            p.close(engine)
    return [p.result() for p in programs]
