"""Automatic prefix caching: full KV blocks are found again by their content.

A block's key chains its parent's key with its own token ids:

    key(block i) = (id of key(block i-1), tokens[i*bs : (i+1)*bs])     root parent id = 0

The parent enters as a small integer (a key id, never reused), so keys stay
short and equality is exact: no hash collision can ever alias two contents.
A request takes every cached block that matches its leading full blocks and
computes only the rest; its last token is always computed (its logits are needed).
"""
from __future__ import annotations

import itertools

from kvloom.kv.block_pool import BlockPool

ROOT = 0


class PrefixCache:
    def __init__(self, pool: BlockPool, block_size: int, salt: object = None):
        self.pool = pool
        self.block_size = block_size
        self.salt = salt                      # anything else that changes KV content (KV dtype, adapter...)
        self._key_ids: dict[tuple, int] = {}  # key -> id used as the parent of the next block's key
        self._ids = itertools.count(1)
        self.queries = 0                      # tokens looked up at admission
        self.hits = 0                         # of which were found cached

    def _key(self, parent_id: int, tokens: list[int]) -> tuple:
        return (parent_id, self.salt, tuple(tokens))

    def _key_id(self, key: tuple) -> int:
        kid = self._key_ids.get(key)
        if kid is None:
            kid = self._key_ids[key] = next(self._ids)
        return kid

    def match(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """Cached blocks for the longest run of leading full blocks, at most (len - 1) tokens' worth.

        Returns (blocks, their key ids). The caller must share() the blocks it keeps.
        """
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        blocks, kids = [], []
        parent = ROOT
        for i in range(max_blocks):
            key = self._key(parent, token_ids[i * bs:(i + 1) * bs])
            block = self.pool.lookup(key)
            if block is None:
                break
            blocks.append(block)
            parent = self._key_id(key)
            kids.append(parent)
        return blocks, kids

    def record(self, num_queried: int, num_hit: int) -> None:
        """Count one admission's lookup (only admissions that went through)."""
        self.queries += num_queried
        self.hits += num_hit

    def register(self, token_ids: list[int], block_ids: list[int], key_ids: list[int], num_computed: int) -> None:
        """Give keys to a sequence's blocks that have become full (and computed) since the last call.

        key_ids is the sequence's chain so far; it is extended in place.
        """
        bs = self.block_size
        for i in range(len(key_ids), num_computed // bs):
            parent = key_ids[-1] if key_ids else ROOT
            key = self._key(parent, token_ids[i * bs:(i + 1) * bs])
            self.pool.set_key(block_ids[i], key)
            key_ids.append(self._key_id(key))

    def forget_unused_keys(self) -> None:
        """Drop key ids of contents no block holds any more (bounded memory over a long run)."""
        if len(self._key_ids) > 4 * self.pool.num_blocks:
            self._key_ids = {k: v for k, v in self._key_ids.items() if self.pool.lookup(k) is not None}

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
