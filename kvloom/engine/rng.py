"""Per-request randomness keyed by position.

Before each step's draws, a sampled request's generator is re-seeded from (its seed, how many tokens it has
output). Its draws then depend on nothing but its seed and its own tokens: not on the batch, not on the
generator's history. A request rebuilt from its tokens alone (one resumed after its instance died) draws
exactly what it would have, and a snapshot needs no generator state.
"""
from __future__ import annotations

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): nearby positions and seeds give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1       # 63 bits: any torch generator takes it


def reseed(req) -> None:
    """Key req's generator to its next output position (greedy requests have none)."""
    if req.generator is not None:
        req.generator.manual_seed(step_seed(req.params.seed, len(req.output_token_ids)))
