"""Automatic prefix caching: full KV blocks are found again by their content.

A block's key is a content hash that chains its parent's key, a salt and its token ids:

    key(block i) = blake2b(key(block i-1) | salt | tokens[i*bs : (i+1)*bs])      root parent = b""

The key depends only on content, so it is the same in every process and on every
machine: two engine instances can tell which prefixes each holds (the cluster's
prefix affinity). The salt keeps KV that differs for the same tokens apart: the
engine's precision settings, and per request a tenant's `cache_salt` or an adapter id.
A hash can collide, so the pool stores each keyed block's parent key and tokens and
a lookup that finds other content under the key is a miss (counted), never a wrong hit.
A request takes every cached block that matches its leading full blocks and
computes only the rest; its last token is always computed (its logits are needed).
"""
from __future__ import annotations

import hashlib
from array import array

from kvloom.kv.block_pool import BlockContent, BlockPool

ROOT = b""
KEY_BYTES = 16


def block_key(parent: bytes, salt: bytes, tokens) -> bytes:
    """The content key of a full block (stable across processes: no Python hash())."""
    h = hashlib.blake2b(parent, digest_size=KEY_BYTES)
    h.update(len(salt).to_bytes(4, "little"))
    h.update(salt)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def salt_bytes(*parts) -> bytes:
    """Engine settings and a request's salt as bytes (None parts are left out)."""
    return "\x1f".join(repr(p) for p in parts if p is not None).encode()


class PrefixCache:
    def __init__(self, pool: BlockPool, block_size: int, salt: object = None):
        self.pool = pool
        self.block_size = block_size
        self.engine_salt = salt                 # what changes KV content engine-wide (dtype, quantization)
        self.queries = 0                        # tokens looked up at admission
        self.hits = 0                           # of which were found cached

    def salt_for(self, request_salt: str | None) -> bytes:
        return salt_bytes(self.engine_salt, request_salt)

    def keys(self, token_ids: list[int], salt: bytes, num_blocks: int | None = None,
             parent: bytes = ROOT, first: int = 0) -> list[bytes]:
        """Content keys of the full blocks first..num_blocks-1 of a token sequence."""
        bs = self.block_size
        n = len(token_ids) // bs if num_blocks is None else num_blocks
        out = []
        for i in range(first, n):
            parent = block_key(parent, salt, token_ids[i * bs:(i + 1) * bs])
            out.append(parent)
        return out

    def match(self, token_ids: list[int], salt: bytes) -> tuple[list[int], list[bytes]]:
        """Cached blocks for the longest run of leading full blocks, at most (len - 1) tokens' worth.

        Returns (blocks, their keys). The caller must share() the blocks it keeps.
        """
        bs = self.block_size
        blocks, keys = [], []
        parent = ROOT
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            key = block_key(parent, salt, tokens)
            block = self.pool.lookup(key, BlockContent(parent, tokens))
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
            parent = key
        return blocks, keys

    def record(self, num_queried: int, num_hit: int) -> None:
        """Count one admission's lookup (only admissions that went through)."""
        self.queries += num_queried
        self.hits += num_hit

    def register(self, token_ids: list[int], block_ids: list[int], keys: list[bytes], num_computed: int,
                 salt: bytes) -> None:
        """Give keys to a sequence's blocks that have become full (and computed) since the last call.

        keys is the sequence's chain so far; it is extended in place.
        """
        bs = self.block_size
        for i in range(len(keys), num_computed // bs):
            parent = keys[-1] if keys else ROOT
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            key = block_key(parent, salt, tokens)
            self.pool.set_key(block_ids[i], key, BlockContent(parent, tokens))
            keys.append(key)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
