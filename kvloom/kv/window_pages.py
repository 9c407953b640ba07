"""Sliding-window layers' KV pages: a long request's local-attention KV stays bounded (Gemma 3).

A model with sliding-window layers keeps its KV in pages of one BlockPool, each page holding the KV of a
group of layers for one block of tokens (windowed_kv_cache.py): group 0 is the full-attention layers, the
later groups share out the sliding ones. A request's block table (Request.block_ids) is group 0's pages, and
each such page is also the block's identity: prefix-cache keys, forks, sessions and moves use it as before.
This file hangs the sliding groups' pages of a block off that block, for as long as some holder needs them.

A query at position p reads keys from p - window + 1 on, so a request that has computed n tokens holds the
sliding pages of its blocks from about first_needed(n) on. As it advances, the blocks it leaves behind lose one
holder; a block nobody holds gives its sliding pages back to the pool, keyed, so a prefix hit can still take
them up until the pool reuses them. Every page of a block comes and goes together: a block has all its
sliding pages or none.

The pool is shared, so a block costs 1 + num_groups pages while in a window and one page after: the
scheduler counts pages (Scheduler.pages_per_block) and no split between the groups is fixed in advance.
"""
from __future__ import annotations

import torch

from kvloom.kv.block_pool import BlockPool


class WindowPages:
    def __init__(self, pool: BlockPool, block_size: int, window: int, num_groups: int, device=None):
        self.pool = pool
        self.block_size = block_size
        self.window = window
        self.num_groups = num_groups            # sliding groups, each with a page per block
        self.null = pool.num_blocks             # the all-zero page a released block reads as (masked out)
        self._pages: dict[int, list[int]] = {}  # block -> its sliding pages, one per group
        self._holders: dict[int, int] = {}      # block -> requests holding its sliding pages
        self._owner: dict[int, int] = {}        # sliding page -> the block it belongs to
        # Per group, held block -> page as a tensor, so attention metadata is remapped in one indexing op. A block
        # nobody holds reads the null page: a release too early shows in the tokens, not only under memory pressure.
        self.lookup = torch.full((num_groups, pool.num_blocks + 1), self.null, dtype=torch.long, device=device)
        pool.on_reuse = self._on_reuse

    @property
    def pages_per_block(self) -> int:
        return 1 + self.num_groups

    def first_needed(self, num_computed: int) -> int:
        """The first block a request with num_computed tokens still reads in its sliding layers: the next
        query, at position num_computed, sees keys from num_computed - window + 1 on."""
        return max(0, (num_computed - self.window + 1) // self.block_size)

    def first_kept(self, num_computed: int) -> int:
        """Where a holder lets go as it advances: one block before first_needed, so a fork of it one token
        behind (a sample that waited at the prompt's last token) still finds every page it reads."""
        return max(0, self.first_needed(num_computed) - 1)

    def has(self, block: int) -> bool:
        return block in self._pages

    def held(self, block: int) -> bool:
        return self._holders.get(block, 0) > 0

    # ---- a request's holds ----------------------------------------------------------------

    def hold(self, block: int, fresh: bool) -> None:
        """One more holder of the block's sliding pages. fresh: the block is new content (its pages are
        taken from the pool, the caller counted them); else they must still exist."""
        if fresh and block in self._pages and not self.held(block):
            self._discard(block)
        if block not in self._pages:
            if not fresh:
                raise RuntimeError(f"KV block {block}'s sliding-window pages are gone")
            pages = self.pool.allocate(self.num_groups)
            if pages is None:
                raise RuntimeError("no KV pages left for a block's sliding-window layers")
            self._attach(block, pages)
        elif not self.held(block):
            for p in self._pages[block]:
                self.pool.share(p)        # revived from the free list, still keyed
        if not self.held(block):
            self.lookup[:, block] = torch.tensor(self._pages[block])
        self._holders[block] = self._holders.get(block, 0) + 1

    def drop(self, block: int) -> None:
        n = self._holders[block] - 1
        if n:
            self._holders[block] = n
            return
        del self._holders[block]
        self.lookup[:, block] = self.null
        pages = self._pages[block]
        for g, p in enumerate(pages):       # keyed: a prefix hit may take them up again
            if self.pool.key_of(p) is None:
                self.pool.set_key(p, ("window", block, g))
        self.pool.free(pages)

    def hold_range(self, block_ids: list[int], first: int) -> None:
        for b in block_ids[first:]:
            self.hold(b, fresh=False)

    def drop_range(self, block_ids: list[int], first: int) -> None:
        for b in block_ids[first:]:
            self.drop(b)

    def usable(self, block_ids: list[int], num_computed: int) -> int:
        """The most of num_computed tokens a request can start from with these blocks: every block its
        sliding layers read must still have its pages. num_computed itself, or a whole number of blocks."""
        bs = self.block_size
        c = num_computed
        while c > 0:
            if all(b in self._pages for b in block_ids[self.first_needed(c):-(-c // bs)]):
                return c
            c = (c - 1) // bs * bs
        return 0

    # ---- for the runner -------------------------------------------------------------------

    def pages_of(self, block: int) -> list[int]:
        """The block's sliding pages, the null page for each group when it has none."""
        return self._pages.get(block) or [self.null] * self.num_groups

    # ---- bookkeeping ------------------------------------------------------------------------

    def _attach(self, block: int, pages: list[int]) -> None:
        self._pages[block] = pages
        for p in pages:
            self._owner[p] = block

    def _discard(self, block: int) -> None:
        """Forget a block's (free) sliding pages: its content changed or one of them was reused."""
        pages = self._pages.pop(block)
        for p in pages:
            del self._owner[p]
            self.pool.unkey(p)

    def _on_reuse(self, page: int) -> None:
        """The pool handed a page out for new content: what it held before is gone."""
        if page in self._pages and not self.held(page):     # a block: its old sliding pages are stale
            self._discard(page)
        owner = self._owner.get(page)
        if owner is not None:                # one block's sliding page: the block loses them all
            self._discard(owner)

    @property
    def num_pages_held(self) -> int:
        return sum(len(self._pages[b]) for b in self._holders)


def allocate_scratch(pool: BlockPool, window: WindowPages | None, n: int) -> list[int] | None:
    """n blocks for a computation outside any request (an evaluation window, a timing), with their sliding
    pages when the model has them; None when the pool has too few free pages."""
    per_block = 1 if window is None else window.pages_per_block
    if pool.num_free < n * per_block:
        return None
    blocks = pool.allocate(n)
    if window is not None:
        for b in blocks:
            window.hold(b, fresh=True)
    return blocks


def free_scratch(pool: BlockPool, window: WindowPages | None, blocks: list[int]) -> None:
    if window is not None:
        for b in blocks:
            window.drop(b)
    pool.free(blocks)
