"""Attention over the paged KV pool for one mixed batch.

The flat batch holds decode tokens first (one per request), then prompt
chunks. Each token's K/V is written to its slot in the pool before attention,
so a chunk attends to every earlier token of its request plus itself:

    pool slots   [ req A: 0..15 | req B: 16..31 | ... ]   (blocks of block_size)
    decode row   q(1)  x  K[context of its request]        masked past its length
    prefill      q(n)  x  K[context_len]   causal, offset by context_len - n

Model code sees only this metadata: it knows nothing of requests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    start: int                 # index of the chunk's first token in the flat batch
    length: int                # tokens in the chunk
    context_slots: torch.Tensor  # [context_len] pool slot of each token it attends to
    causal_mask: torch.Tensor | None  # [length, context_len] bool; None when plain causal (no earlier KV)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor            # [T] pool slot each token's K/V is written to
    num_decodes: int                      # the first num_decodes tokens are single-token decodes
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] block ids (padded)
    decode_bias: torch.Tensor | None      # [num_decodes, 1, 1, max_blocks*block_size] 0 or -inf
    prefills: list[PrefillChunk]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values ([T, kv_heads, head_dim]) at their slots."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, block_size: int, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim]; caches: [num_slots, kv_heads, head_dim]. Returns [T, heads, head_dim]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)

    nd = meta.num_decodes
    if nd:
        # Gather whole blocks: [nd, max_blocks, block_size, kv_heads, D] -> [nd, L, kv_heads, D].
        blocks_k = k_cache.view(-1, block_size, num_kv_heads, head_dim)[meta.decode_block_tables]
        blocks_v = v_cache.view(-1, block_size, num_kv_heads, head_dim)[meta.decode_block_tables]
        ctx_k = blocks_k.view(nd, -1, num_kv_heads, head_dim).permute(0, 2, 3, 1)  # [nd, kvh, D, L]
        ctx_v = blocks_v.view(nd, -1, num_kv_heads, head_dim).transpose(1, 2)      # [nd, kvh, L, D]
        qd = q[:nd].view(nd, num_kv_heads, group, head_dim)
        scores = torch.matmul(qd, ctx_k).mul_(scale).add_(meta.decode_bias)        # [nd, kvh, G, L]
        probs = torch.softmax(scores, dim=-1)
        out[:nd] = torch.matmul(probs, ctx_v).view(nd, num_heads, head_dim)

    for chunk in meta.prefills:
        s, n = chunk.start, chunk.length
        qc = q[s:s + n].transpose(0, 1).unsqueeze(0)                              # [1, H, n, D]
        kc = k_cache[chunk.context_slots].transpose(0, 1).unsqueeze(0)           # [1, kvh, L, D]
        vc = v_cache[chunk.context_slots].transpose(0, 1).unsqueeze(0)
        if chunk.causal_mask is None:
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale,
                                               enable_gqa=group > 1)
        else:
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=chunk.causal_mask, scale=scale,
                                               enable_gqa=group > 1)
        out[s:s + n] = o[0].transpose(0, 1)
    return out
