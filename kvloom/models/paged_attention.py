"""Attention over the paged KV pool for one mixed batch.

The pool of one layer holds K and V as [num_blocks, kv_heads, block_size, head_dim]
(in the model's dtype, or int8 with scales: kvloom/kv/). A token at position p
of a request lives in block block_ids[p // block_size], row p % block_size.
Gathering a request's blocks head by head, as rows of the pool viewed as
[num_blocks * kv_heads, block_size, head_dim], yields its context already laid
out as [kv_heads, blocks * block_size, head_dim]: one gather, no further copy.

The flat batch holds decode tokens first (one per request), then prompt
chunks. Each token's K/V is written to the pool before attention, so a chunk
attends to every earlier token of its request plus itself:

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
    start: int                   # index of the chunk's first token in the flat batch
    length: int                  # tokens in the chunk
    context_len: int             # tokens it attends to: earlier ones and its own
    head_blocks: torch.Tensor    # [kv_heads, blocks] rows of the pool viewed as [num_blocks * kv_heads, ...]
    causal_mask: torch.Tensor | None  # [length, context_len] bool; None when plain causal (no earlier KV)
    staged: tuple[torch.Tensor, ...] | None = None  # int8 KV: (block index, staging slot) of float-staged blocks


@dataclass
class AttentionMetadata:
    write_blocks: torch.Tensor            # [T] block each token's K/V is written to
    write_offsets: torch.Tensor           # [T] its row within the block
    num_decodes: int                      # the first num_decodes tokens are single-token decodes
    decode_head_blocks: torch.Tensor | None  # [num_decodes, kv_heads, max_blocks] pool rows (padded)
    decode_bias: torch.Tensor | None      # [num_decodes, 1, 1, max_blocks*block_size] 0 or -inf
    prefills: list[PrefillChunk]
    decode_tables: torch.Tensor | None = None   # native kernel: [num_decodes, max_blocks] block ids (padded)
    decode_lens: torch.Tensor | None = None     # native kernel: [num_decodes] context length with the new token
    decode_slots: torch.Tensor | None = None    # native kernel, int8 KV: staging slot per table entry, -1 sealed
    write_slots: torch.Tensor | None = None     # int8 KV: [T] staging slot each token's key goes to
    decode_staged: tuple[torch.Tensor, ...] | None = None  # int8 KV: (decode row, block index, slot)
    # Native decode stack (kvloom/models/decode_stack.py): every query row of the batch as a decode.
    row_tables: torch.Tensor | None = None      # [T, max_blocks] block ids (padded)
    row_lens: torch.Tensor | None = None        # [T] context length up to and including the row
    row_masks: torch.Tensor | None = None       # [T] int64: which of the last 64 positions the row sees


def head_block_rows(block_ids: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., blocks] block ids -> [..., kv_heads, blocks] rows of the pool seen as [num_blocks * kv_heads, ...]."""
    heads = torch.arange(num_kv_heads, device=block_ids.device)
    return block_ids.unsqueeze(-2) * num_kv_heads + heads[:, None]


def paged_attention(q: torch.Tensor, kv, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim]; kv: one layer's cache (kvloom.kv.kv_cache). Returns [T, heads, head_dim]."""
    num_heads, head_dim = q.shape[1:]
    out = torch.empty_like(q)

    nd = meta.num_decodes
    if nd and meta.decode_tables is not None:   # native kernel: reads the blocks in place
        out[:nd] = kv.decode_attention(q[:nd], meta, scale)
    elif nd:
        ctx_k, ctx_v = kv.decode_context(meta)                                          # [nd, kvh, L, D]
        num_kv_heads = ctx_k.shape[1]
        qd = q[:nd].view(nd, num_kv_heads, num_heads // num_kv_heads, head_dim)
        scores = torch.matmul(qd, ctx_k.transpose(-1, -2)).mul_(scale).add_(meta.decode_bias)  # [nd, kvh, G, L]
        probs = torch.softmax(scores, dim=-1)
        out[:nd] = torch.matmul(probs, ctx_v).view(nd, num_heads, head_dim)

    for chunk in meta.prefills:
        s, n, L = chunk.start, chunk.length, chunk.context_len
        kc, vc = kv.chunk_context(chunk)                                                 # [kvh, blocks*bs, D]
        qc = q[s:s + n].transpose(0, 1).unsqueeze(0)                                     # [1, H, n, D]
        o = F.scaled_dot_product_attention(qc, kc[:, :L].unsqueeze(0), vc[:, :L].unsqueeze(0),
                                           attn_mask=chunk.causal_mask, is_causal=chunk.causal_mask is None,
                                           scale=scale, enable_gqa=kc.shape[0] != num_heads)
        out[s:s + n] = o[0].transpose(0, 1)
    return out
