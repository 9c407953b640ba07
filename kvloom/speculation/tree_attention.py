"""The shape of a draft tree as attention sees it: positions by depth, a mask of ancestors.

Draft tokens sit in consecutive KV slots after the context, in tree order, but
two siblings are alternatives at the same position: each token attends to the
context, to its ancestors and to itself, and is rotated by its depth.
"""
from __future__ import annotations

import torch


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of each draft token below the context's last token (its children are at depth 1)."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths


def tree_mask(parents: list[int]) -> torch.Tensor:
    """[k, k] bool: row i may attend to draft j when j is i or one of its ancestors."""
    k = len(parents)
    mask = torch.zeros(k, k, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def tree_visibility_bits(parents: list[int]) -> list[int]:
    """Per draft token, as the native kernels take it: bit d set when the slot d places before its own is
    visible (bit 0: itself). Earlier drafts that are not its ancestors are cleared; all else stays set.
    Returned as signed 64-bit values (trees of up to 63 tokens)."""
    rows = tree_mask(parents)
    bits = []
    for i in range(len(parents)):
        b = -1
        for j in range(i):
            if not rows[i, j]:
                b &= ~(1 << (i - j))
        bits.append(b)
    return bits
