"""The KV block allocator: reference counts, an LRU of free blocks, and content keys for prefix reuse.

Pure bookkeeping, no torch: the runner owns the tensors, this owns which
block belongs to whom. Invariants:
- a block is in the free LRU exactly when its reference count is zero;
- a free block keeps its content key (and so stays a prefix-cache hit) until
  allocate() needs it: blocks with no content go first, then the least
  recently freed.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import NamedTuple


class BlockContent(NamedTuple):
    """What a keyed block holds, kept to check a key hit against (hash keys can collide)."""
    parent: bytes
    tokens: tuple[int, ...]


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self._key_of: list[Hashable | None] = [None] * num_blocks
        self._by_key: dict[Hashable, int] = {}
        self._content: list[BlockContent | None] = [None] * num_blocks
        self.num_evictions = 0
        self.num_collisions = 0     # key hits whose stored content differed: served as misses
        # Told when a block leaves its last sequence, and whether it holds full, keyed content
        # (the int8 KV pool seals or drops the block's float staging then).
        self.on_release: Callable[[int, bool], None] | None = None
        # Told when allocate() hands a block out for new content (what it held before is gone).
        self.on_reuse: Callable[[int], None] | None = None

    @property
    def num_free(self) -> int:
        """Blocks allocate() can hand out, cached ones included."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._by_key)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int] | None:
        """n blocks for new content, or None (and nothing taken) when fewer than n are free."""
        if n > len(self._free):
            return None
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._forget(b)
            self._refs[b] = 1
            blocks.append(b)
        if self.on_reuse is not None:
            for b in blocks:
                self.on_reuse(b)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Pass a sequence's blocks in order: its tail is evicted first."""
        for b in reversed(blocks):
            if self._refs[b] <= 0:
                raise RuntimeError(f"KV block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None
                if self._key_of[b] is None:
                    self._free.move_to_end(b, last=False)  # nothing worth keeping: reuse it first
                if self.on_release is not None:
                    self.on_release(b, self._key_of[b] is not None)

    def share(self, block: int) -> None:
        """Take one more reference to a block (a prefix-cache hit, a fork); revives it if it was free."""
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1

    # ---- content keys (prefix caching) ----------------------------------------------------

    def lookup(self, key: Hashable, content: BlockContent | None = None) -> int | None:
        """The block holding `key`; with `content`, only if it holds exactly that (else a counted collision)."""
        block = self._by_key.get(key)
        if block is not None and content is not None and self._content[block] != content:
            self.num_collisions += 1
            return None
        return block

    def key_of(self, block: int) -> Hashable | None:
        return self._key_of[block]

    def set_key(self, block: int, key: Hashable, content: BlockContent | None = None) -> int:
        """Record that a full block holds the content `key`. Returns the block that now answers for the key
        (an earlier block with the same key keeps that role, even when a collision gave it other content)."""
        holder = self._by_key.get(key)
        if holder is not None:
            if content is not None and self._content[holder] != content:
                self.num_collisions += 1
            return holder
        self._by_key[key] = block
        self._key_of[block] = key
        self._content[block] = content
        return block

    def unkey(self, block: int) -> None:
        """Drop a free block's content key (what it held is no longer wanted): it is reused first."""
        if self._key_of[block] is not None:
            del self._by_key[self._key_of[block]]
            self._key_of[block] = self._content[block] = None
        if self._refs[block] == 0:
            self._free.move_to_end(block, last=False)

    def cached_keys(self) -> list[Hashable]:
        """Every content key the pool holds (an instance's prefix summary for a global scheduler)."""
        return list(self._by_key)

    def _forget(self, block: int) -> None:
        key = self._key_of[block]
        if key is not None:
            del self._by_key[key]
            self._key_of[block] = None
            self._content[block] = None
            self.num_evictions += 1
