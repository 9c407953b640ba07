"""The physical KV pool in the model's dtype, or in float16 (--kv-cache-dtype float16, llama.cpp's default: half
the bytes each decode reads): per layer, K and V tensors of [num_blocks, kv_heads, block_size, head_dim].

Owned by the model runner alone; the scheduler only ever sees block ids.
Attention reaches the pool through the three methods every layer cache has
(write, decode_context, chunk_context), so the int8 pool (int8_kv_cache.py)
slots in behind the same calls.
"""
from __future__ import annotations

import torch

from kvloom.kernels import kernels
from kvloom.kv.int8_kv_cache import Int8KVCache, int8_kv_bytes_per_token, staging_bytes_per_slot
from kvloom.models.llama import LlamaShape
from kvloom.attention.metadata import AttentionMetadata, NativeDecodes, SpanAttention, TorchDecodes


class FloatLayerKV:
    """dtype: what the model computes in (and what the torch backend's context reads return); store_dtype: what
    the pool holds. Stores round to nearest even; reads widen exactly, so every reader sees the same values."""

    def __init__(self, num_blocks: int, shape: LlamaShape, block_size: int, dtype: torch.dtype,
                 device: torch.device, store_dtype: torch.dtype | None = None):
        dims = (num_blocks, shape.num_kv_heads, block_size, shape.head_dim)
        self.dtype = dtype
        self.k = torch.zeros(dims, dtype=store_dtype or dtype, device=device)
        self.v = torch.zeros(dims, dtype=store_dtype or dtype, device=device)
        # Rows of the pool seen as [num_blocks * kv_heads, block_size, head_dim]: what a head-block gather reads.
        self._rows_k = self.k.view(-1, block_size, shape.head_dim)
        self._rows_v = self.v.view(-1, block_size, shape.head_dim)

    def write(self, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store this step's keys and values ([T, kv_heads, head_dim]) in their blocks."""
        self.k[meta.write_blocks, :, meta.write_offsets] = k.to(self.k.dtype)
        self.v[meta.write_blocks, :, meta.write_offsets] = v.to(self.v.dtype)

    def decode_context(self, decodes: TorchDecodes) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every decode's blocks: [num_decodes, kv_heads, max_blocks * block_size, head_dim]."""
        nd, kvh = decodes.head_blocks.shape[:2]
        d = self.k.shape[-1]
        return (self._rows_k[decodes.head_blocks].view(nd, kvh, -1, d).to(self.dtype),
                self._rows_v[decodes.head_blocks].view(nd, kvh, -1, d).to(self.dtype))

    def decode_attention(self, q: torch.Tensor, decodes: NativeDecodes, scale: float, window: int = 0) -> torch.Tensor:
        """window > 0: each row sees only the last `window` positions of its context (a sliding layer)."""
        return kernels().decode_attention_f32(q.contiguous(), self.k, self.v, decodes.tables, decodes.lens, scale,
                                              decodes.masks, window)

    def chunk_context(self, chunk: SpanAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a prompt chunk's blocks: [kv_heads, blocks * block_size, head_dim]."""
        kvh, d = chunk.head_blocks.shape[0], self.k.shape[-1]
        return (self._rows_k[chunk.head_blocks].view(kvh, -1, d).to(self.dtype),
                self._rows_v[chunk.head_blocks].view(kvh, -1, d).to(self.dtype))

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.k.index_copy_(0, dst, self.k[src])
        self.v.index_copy_(0, dst, self.v[src])


class FloatKVCache:
    """All layers' float pools. prepare/seal/release are no-ops: a float block is final when written."""

    def __init__(self, num_blocks: int, shape: LlamaShape, block_size: int, dtype: torch.dtype,
                 device: torch.device, store_dtype: torch.dtype | None = None):
        self.device = device
        self.layers = [FloatLayerKV(num_blocks, shape, block_size, dtype, device, store_dtype)
                       for _ in range(shape.num_layers)]
        self.layout = {"kind": "float", "dtype": str(store_dtype or dtype), "block_size": block_size,
                       "num_layers": shape.num_layers, "kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim}

    # ---- block I/O (moving requests between engines) --------------------------------------

    def read_blocks(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        """Copies of the blocks' K and V, every layer: [num_layers, len(blocks), kv_heads, block_size, head_dim]."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        out = {}
        for name in ("k", "v"):     # gathered straight into one tensor: a migration's KV is copied once
            first = getattr(self.layers[0], name)
            dst = torch.empty((len(self.layers), len(blocks), *first.shape[1:]), dtype=first.dtype, device=self.device)
            for i, layer in enumerate(self.layers):
                torch.index_select(getattr(layer, name), 0, idx, out=dst[i])
            out[name] = dst.cpu()
        return out

    def write_blocks(self, blocks: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Store blocks read by read_blocks (of a cache with the same layout) into these blocks."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for i, layer in enumerate(self.layers):
            layer.k.index_copy_(0, idx, tensors["k"][i].to(self.device))
            layer.v.index_copy_(0, idx, tensors["v"][i].to(self.device))

    def prepare(self, chunks, meta: AttentionMetadata) -> list[int]:
        return []

    def seal(self, blocks: list[int]) -> None:
        pass

    def release(self, block: int, holds_full_content: bool) -> None:
        pass

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for layer in self.layers:
            layer.copy_blocks(src, dst)


def staging_capacity(max_num_seqs: int, max_num_batched_tokens: int, block_size: int) -> int:
    """Int8 staging slots counted in the budget: one open block per running request plus one step's writes."""
    return max_num_seqs + -(-max_num_batched_tokens // block_size) + 1


def num_blocks_for(memory_bytes: int, shape: LlamaShape, block_size: int, dtype: torch.dtype,
                   kv_cache_dtype: str = "auto", num_staging_slots: int = 0) -> int:
    if kv_cache_dtype == "int8":
        memory_bytes -= num_staging_slots * staging_bytes_per_slot(shape, dtype, block_size)
        return max(0, int(memory_bytes // (int8_kv_bytes_per_token(shape, dtype, block_size) * block_size)))
    return memory_bytes // (shape.kv_bytes_per_token(pool_dtype(kv_cache_dtype, dtype)) * block_size)


_POOL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pool_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """What a float pool holds: the named float type, or the model's dtype (auto)."""
    return _POOL_DTYPES.get(kv_cache_dtype, dtype)


def kv_bytes_per_token(shape: LlamaShape, dtype: torch.dtype, kv_cache_dtype: str, block_size: int) -> float:
    if kv_cache_dtype == "int8":
        return int8_kv_bytes_per_token(shape, dtype, block_size)
    return shape.kv_bytes_per_token(pool_dtype(kv_cache_dtype, dtype))


def allocate_kv_cache(kv_cache_dtype: str, num_blocks: int, shape: LlamaShape, block_size: int,
                      dtype: torch.dtype, device: torch.device, num_staging_slots: int = 0):
    if kv_cache_dtype == "int8":
        return Int8KVCache(num_blocks, shape, block_size, dtype, device, max(1, num_staging_slots))
    return FloatKVCache(num_blocks, shape, block_size, dtype, device, pool_dtype(kv_cache_dtype, dtype))
