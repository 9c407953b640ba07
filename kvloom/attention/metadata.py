"""What attention needs to know about one step, built by the step's backend (backend.py).

The pool of one layer holds K and V as [num_blocks, kv_heads, block_size, head_dim]
(in the model's dtype, or int8 with scales: kvloom/kv/). A token at position p
of a request lives in block block_ids[p // block_size], row p % block_size.
Gathering a request's blocks head by head, as rows of the pool viewed as
[num_blocks * kv_heads, block_size, head_dim], yields its context already laid
out as [kv_heads, blocks * block_size, head_dim]: one gather, no further copy.

The flat batch holds decode tokens first (one per request), then spans (prompt
chunks, and decodes carrying drafts). Each token's K/V is written to the pool
before attention, so a span attends to every earlier token of its request plus itself.
Model code sees only this metadata: it knows nothing of requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SpanAttention:
    """One span's attention call: its queries against its request's context."""

    start: int                   # index of the span's first token in the flat batch
    length: int                  # tokens in the span
    context_len: int             # tokens it attends to: earlier ones and its own
    head_blocks: torch.Tensor    # [kv_heads, blocks] rows of the pool viewed as [num_blocks * kv_heads, ...]
    causal_mask: torch.Tensor | None  # [length, context_len] bool; None when plain causal (no earlier KV)
    staged: tuple[torch.Tensor, ...] | None = None  # int8 KV: (block index, staging slot) of float-staged blocks
    rows: NativeDecodes | None = None   # native backend, float KV: each token as a decode over its own prefix
    window_mask: torch.Tensor | None = None  # [length, context_len] bool for sliding layers, when the window hides
                                             # some key from some query (else they read causal_mask)


@dataclass
class TorchDecodes:
    """Decode rows for the PyTorch path: gathered contexts, padded to the longest and masked past each."""

    head_blocks: torch.Tensor             # [num_decodes, kv_heads, max_blocks] pool rows (padded)
    bias: torch.Tensor                    # [num_decodes, 1, 1, max_blocks * block_size] 0 or -inf
    window_bias: torch.Tensor | None = None   # the same within the sliding window, when it hides some key
    staged: tuple[torch.Tensor, ...] | None = None   # int8 KV: (decode row, block index, slot)

    def add_staging(self, staged: list[tuple[int, int, int]], device) -> None:
        if staged:
            self.staged = tuple(torch.tensor(x, device=device) for x in zip(*staged))


@dataclass
class NativeDecodes:
    """Decode rows for the native kernel, which reads the blocks in place."""

    tables: torch.Tensor                  # [num_decodes, max_blocks] block ids (padded)
    lens: torch.Tensor                    # [num_decodes] context length with the new token
    slots: torch.Tensor | None = None     # int8 KV: staging slot per table entry, -1 where sealed
    masks: torch.Tensor | None = None     # [num_decodes] int64 draft visibility (StackRows.masks); None: all seen

    def add_staging(self, staged: list[tuple[int, int, int]], device) -> None:
        self.slots = staging_slots(self.tables.shape, staged, device)


def staging_slots(shape, staged: list[tuple[int, int, int]], device) -> torch.Tensor:
    """int8 KV: a table's staging slot per entry ([rows, max_blocks], -1 where sealed) from (row, column, slot)."""
    slots = torch.full(shape, -1, dtype=torch.long)
    for row, col, slot in staged:
        slots[row, col] = slot
    return slots.to(device)


@dataclass
class StackRows:
    """The native decode stack's view: every query row of the step as a decode over its own prefix."""

    tables: torch.Tensor                  # [T, max_blocks] block ids (padded)
    lens: torch.Tensor                    # [T] context length up to and including the row
    masks: torch.Tensor | None            # [T] int64: which of the last 64 positions the row sees (-1: all);
                                          # None: plain decodes only
    slots: torch.Tensor | None = None     # int8 KV: [T, max_blocks] staging slot per table entry, -1 where sealed


@dataclass
class AttentionMetadata:
    backend: object                       # the backend that built it (backend.py); it runs the decode rows
    write_blocks: torch.Tensor            # [T] block each token's K/V is written to
    write_offsets: torch.Tensor           # [T] its row within the block
    num_decodes: int                      # the first num_decodes tokens are single-token decodes
    decodes: TorchDecodes | NativeDecodes | None = None
    spans: list[SpanAttention] = field(default_factory=list)
    rows: StackRows | None = None         # decode-stack steps only (then decodes and spans are not built)
    write_slots: torch.Tensor | None = None   # int8 KV: [T] staging slot each token's key goes to
    # Not attention's, but the step's per-token facts travel together: [T] each token's LoRA adapter slot
    # (-1: none), set only when some row has an adapter (kvloom/lora/tables.py).
    lora_slots: torch.Tensor | None = None
    # A model whose sliding layers keep their KV in pages of their own (kv/windowed_kv_cache.py): this step's
    # metadata for each sliding group g at window_groups[g - 1], the same but for where the KV lives.
    window_groups: list[AttentionMetadata] | None = None

    def for_group(self, group: int) -> AttentionMetadata:
        return self if group == 0 or self.window_groups is None else self.window_groups[group - 1]


def head_block_rows(block_ids: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., blocks] block ids -> [..., kv_heads, blocks] rows of the pool seen as [num_blocks * kv_heads, ...]."""
    heads = torch.arange(num_kv_heads, device=block_ids.device)
    return block_ids.unsqueeze(-2) * num_kv_heads + heads[:, None]
