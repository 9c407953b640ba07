"""The float KV pool of a model with sliding-window layers, in pages of a group of layers (window_pages.py).

Layers are grouped in groups of equal size: group 0 holds the full-attention layers, groups 1.. the sliding
ones in order (the last may be short). The j-th layer of every group stores its K and V in one tensor
[num_pages + 1, kv_heads, block_size, head_dim], at the page its group's table names: group 0's page of a
block is the block id itself, the sliding groups' pages come from WindowPages. Page num_pages is all zeros
and never written: a released block's sliding layers read it, under the window's mask.
"""
from __future__ import annotations

import copy

import torch

from kvloom.attention.metadata import AttentionMetadata, NativeDecodes
from kvloom.kv.kv_cache import FloatKVCache, FloatLayerKV
from kvloom.models.llama import LlamaShape


class LayerGroups:
    """Which group, and which place within it, each layer's KV has."""

    def __init__(self, sliding_layers: tuple[bool, ...]):
        full = [i for i, s in enumerate(sliding_layers) if not s]
        sliding = [i for i, s in enumerate(sliding_layers) if s]
        self.size = len(full)
        self.num_layers = len(sliding_layers)
        self.group_of = [0] * self.num_layers
        self.place_of = [0] * self.num_layers
        for j, i in enumerate(full):
            self.place_of[i] = j
        for s, i in enumerate(sliding):
            self.group_of[i], self.place_of[i] = 1 + s // self.size, s % self.size
        self.num_sliding_groups = -(-len(sliding) // self.size)

    @classmethod
    def of(cls, shape: LlamaShape) -> LayerGroups | None:
        """The grouping, or None when the model has no sliding layers or no full-attention ones (nothing to
        name a block by)."""
        sliding = getattr(shape, "sliding_layers", None)
        if not sliding or all(sliding) or not any(sliding):
            return None
        return cls(tuple(sliding))

    def window_reserve(self, window: int, block_size: int) -> int:
        """Sliding pages one request holds at most, on top of a page per block: its window's blocks, the margin
        block, and the one its next token opens."""
        return self.num_sliding_groups * (-(-window // block_size) + 3)

    def longest_context(self, num_pages: int, window: int, block_size: int) -> int:
        """Tokens one request can hold alone in a pool of num_pages pages."""
        return max(0, num_pages - self.window_reserve(window, block_size)) * block_size

    def page_bytes(self, shape: LlamaShape, dtype: torch.dtype, block_size: int) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.size * shape.num_kv_heads * shape.head_dim * elem * block_size


class WindowedKVCache(FloatKVCache):
    def __init__(self, num_pages: int, shape: LlamaShape, block_size: int, dtype: torch.dtype,
                 device: torch.device, groups: LayerGroups, store_dtype: torch.dtype | None = None):
        self.device = device
        self.groups = groups
        self.null = num_pages
        self.places = [FloatLayerKV(num_pages + 1, shape, block_size, dtype, device, store_dtype)
                       for _ in range(groups.size)]
        self.layers = [self.places[groups.place_of[i]] for i in range(groups.num_layers)]
        self.layout = {"kind": "float-windowed", "dtype": str(store_dtype or dtype), "block_size": block_size,
                       "num_layers": shape.num_layers, "kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                       "group_of": list(groups.group_of)}

    def read_blocks(self, tables: list[list[int]]) -> dict[str, torch.Tensor]:
        """Copies of K and V of every layer: tables[g] names the page of each block in group g (the null page
        where a block has none, read as zeros). [num_layers, blocks, kv_heads, block_size, head_dim]."""
        idx = [torch.tensor(t, dtype=torch.long, device=self.device) for t in tables]
        out = {}
        for name in ("k", "v"):
            first = getattr(self.places[0], name)
            dst = torch.empty((self.groups.num_layers, len(tables[0]), *first.shape[1:]), dtype=first.dtype,
                              device=self.device)
            for i, layer in enumerate(self.layers):
                torch.index_select(getattr(layer, name), 0, idx[self.groups.group_of[i]], out=dst[i])
            out[name] = dst.cpu()
        return out

    def write_blocks(self, tables: list[list[int]], tensors: dict[str, torch.Tensor]) -> None:
        """Store blocks read by read_blocks into the pages tables names (entries at the null page are skipped)."""
        for i, layer in enumerate(self.layers):
            table = torch.tensor(tables[self.groups.group_of[i]], dtype=torch.long)
            keep = table != self.null
            idx = table[keep].to(self.device)
            layer.k.index_copy_(0, idx, tensors["k"][i][keep].to(self.device))
            layer.v.index_copy_(0, idx, tensors["v"][i][keep].to(self.device))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Pages are copied in every place: a page holds one group's layers, whichever group it serves."""
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for layer in self.places:
            layer.copy_blocks(src, dst)


def remap_metadata(meta: AttentionMetadata, lookup: torch.Tensor) -> AttentionMetadata:
    """The same step's metadata for a sliding group: every block id replaced by the group's page (lookup:
    block -> page). Masks and lengths are shared; only where the KV lives changes."""
    out = copy.copy(meta)
    out.write_blocks = lookup[meta.write_blocks]
    if meta.decodes is not None:
        out.decodes = _remap_decodes(meta.decodes, lookup)
    out.spans = []
    for span in meta.spans:
        s = copy.copy(span)
        s.head_blocks = _remap_rows(span.head_blocks, lookup)
        if span.rows is not None:
            s.rows = _remap_decodes(span.rows, lookup)
        out.spans.append(s)
    return out


def _remap_decodes(decodes, lookup: torch.Tensor):
    out = copy.copy(decodes)
    if isinstance(decodes, NativeDecodes):
        out.tables = lookup[decodes.tables]
    else:
        out.head_blocks = _remap_rows(decodes.head_blocks, lookup)
    return out


def _remap_rows(rows: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """Pool rows (block * kv_heads + head, laid out [..., kv_heads, blocks]) of blocks -> of their pages."""
    kvh = rows.shape[-2]
    return lookup[rows // kvh] * kvh + rows % kvh
