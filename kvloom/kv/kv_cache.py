"""The physical KV pool: per layer, one key and one value tensor of [num_blocks, kv_heads, block_size, head_dim].

Owned by the model runner alone; the scheduler only ever sees block ids.
"""
from __future__ import annotations

import torch

from kvloom.models.llama import LlamaShape


def num_blocks_for(memory_bytes: int, shape: LlamaShape, block_size: int, dtype: torch.dtype) -> int:
    return memory_bytes // (shape.kv_bytes_per_token(dtype) * block_size)


def allocate_kv_cache(num_blocks: int, block_size: int, shape: LlamaShape, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    dims = (num_blocks, shape.num_kv_heads, block_size, shape.head_dim)
    return [(torch.zeros(dims, dtype=dtype, device=device), torch.zeros(dims, dtype=dtype, device=device))
            for _ in range(shape.num_layers)]
