"""Program-aware KV retention (after ThunderAgent): an agent session keeps its KV between calls.

When a request that carries a session id finishes, its blocks stay with the
session instead of going to the free list, so the next call of the same
program (the previous tokens plus a tool result) computes only its new tokens.
Retained blocks are bounded by a fraction of the pool and a time to live; when
memory is short the longest-idle session is released first. Released blocks
go to the free list with their prefix-cache keys, so they may still be hit.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from kvloom.kv.block_pool import BlockPool


@dataclass
class Session:
    tokens: list[int] = field(default_factory=list)     # tokens whose KV the blocks hold
    block_ids: list[int] = field(default_factory=list)  # one reference each, owned by the session
    block_keys: list[int] = field(default_factory=list)    # prefix-cache chain of the full blocks
    idle_since: float = 0.0


class SessionStore:
    def __init__(self, pool: BlockPool, block_size: int, max_fraction: float, ttl: float):
        self.pool = pool
        self.block_size = block_size
        self.max_blocks = int(max_fraction * pool.num_blocks)
        self.ttl = ttl
        self._sessions: OrderedDict[str, Session] = OrderedDict()   # longest idle first

    @property
    def num_blocks_held(self) -> int:
        return sum(len(s.block_ids) for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def retain(self, session_id: str, tokens: list[int], block_ids: list[int], block_keys: list[int]) -> list[int]:
        """Keep a finished call's KV for its session. Returns the blocks not kept (the caller frees them)."""
        self.release(session_id)
        keep = -(-len(tokens) // self.block_size)
        if keep > self.max_blocks:
            return block_ids
        self._sessions[session_id] = Session(list(tokens), block_ids[:keep], list(block_keys), time.time())
        while self.num_blocks_held > self.max_blocks:
            self.release(next(iter(self._sessions)))
        return block_ids[keep:]

    def adopt(self, session_id: str | None, token_ids: list[int]) -> Session | None:
        """Hand a session's KV to the next call of the program, if it continues the same tokens.

        At most len(token_ids) - 1 tokens are adopted: the last prompt token is always computed.
        """
        s = self._sessions.pop(session_id, None) if session_id else None
        if s is None:
            return None
        n = len(s.tokens)
        if n == 0 or token_ids[:n] != s.tokens:
            self._free(s)  # the program changed course: keep only what the prefix cache holds
            return None
        if n > len(token_ids) - 1:
            # Recompute from the last whole block: the blocks past it may be shared through the prefix cache.
            n = (len(token_ids) - 1) // self.block_size * self.block_size
            keep = n // self.block_size
            self.pool.free(s.block_ids[keep:])
            s.block_ids, s.block_keys, s.tokens = s.block_ids[:keep], s.block_keys[:keep], s.tokens[:n]
        return s

    def release(self, session_id: str) -> bool:
        s = self._sessions.pop(session_id, None)
        if s is not None:
            self._free(s)
        return s is not None

    def release_oldest(self) -> bool:
        """Free the longest-idle session's blocks (memory is short). False when there is none."""
        if not self._sessions:
            return False
        self._free(self._sessions.popitem(last=False)[1])
        return True

    def expire(self, now: float | None = None) -> None:
        now = now or time.time()
        while self._sessions and now - next(iter(self._sessions.values())).idle_since > self.ttl:
            self.release_oldest()

    def _free(self, s: Session) -> None:
        self.pool.free(s.block_ids)
        s.block_ids = []
