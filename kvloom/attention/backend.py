"""The attention backends: each says which steps it can run and builds its own metadata.

    class AttentionBackend(Protocol):
        name: str
        def supports(self, plan) -> bool
        def build(self, plan) -> AttentionMetadata        # the step's metadata, nothing it does not read
        def decode(self, q, layer_kv, meta, scale, sliding)   # decode rows of one layer (module path)

The runner tries them in order (decode stack, native, torch) and the first that
supports a step runs it; which backends exist, and why one is missing, is
reported in /server_info. A model with sliding-window layers (Gemma 3) runs on
the native backend over a float pool, whose kernel takes the window and reads
nothing before it; over an int8 pool it runs on the torch backend, which builds
each step's window masks beside the causal ones for the sliding layers to read.
The window, as the reference's: a query at position p sees keys at positions
p - window + 1 .. p.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from kvloom.attention.metadata import (AttentionMetadata, NativeDecodes, SpanAttention, StackRows, TorchDecodes,
                                       head_block_rows)
from kvloom.engine.scheduler_output import SchedulerOutput
from kvloom.speculation.tree_attention import tree_depths, tree_mask, tree_visibility_bits

# Draft-carrying chunks up to this many tokens run in the stack with the decodes, each token as a decode
# row over its own prefix; longer ones take the module path, whose attention reads a chunk's context once
# for all its tokens. Prompt chunks always take the module path: how a prompt is split into chunks
# depends on what else is scheduled, and its K/V must not depend on that.
STACK_MAX_CHUNK = 16


class AttentionBackend(Protocol):
    name: str

    def supports(self, plan: SchedulerOutput) -> bool: ...

    def build(self, plan: SchedulerOutput) -> AttentionMetadata: ...

    def decode(self, q: torch.Tensor, layer_kv, meta: AttentionMetadata, scale: float,
               sliding: bool = False) -> torch.Tensor: ...


class _Layout:
    def __init__(self, block_size: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device,
                 sliding_window: int | None = None):
        self.block_size, self.num_kv_heads, self.dtype, self.device = block_size, num_kv_heads, dtype, device
        self.sliding_window = sliding_window


def _writes(plan: SchedulerOutput, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    slots = [(c.block_ids[p // block_size], p % block_size) for c in plan.chunks
             for p in range(c.start_pos, c.start_pos + len(c.token_ids))]
    return (torch.tensor([b for b, _ in slots], dtype=torch.long).to(device),
            torch.tensor([o for _, o in slots], dtype=torch.long).to(device))


def _bias(valid: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """[rows, keys] visibility -> [rows, 1, 1, keys] additive bias: 0 or -inf."""
    return torch.zeros(valid.shape, dtype=lay.dtype).masked_fill_(~valid, float("-inf"))[:, None, None, :].to(lay.device)


def _padded_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables])


class TorchAttention:
    """Decode rows gathered from the pool and batched (padded, masked); spans through SDPA. With a sliding
    window, each step also carries the masks of the window for the sliding layers."""

    name = "torch"

    def __init__(self, block_size: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device,
                 sliding_window: int | None = None):
        self.layout = _Layout(block_size, num_kv_heads, dtype, device, sliding_window)

    def supports(self, plan: SchedulerOutput) -> bool:
        return True

    def build(self, plan: SchedulerOutput) -> AttentionMetadata:
        lay = self.layout
        blocks, offsets = _writes(plan, lay.block_size, lay.device)
        meta = AttentionMetadata(self, blocks, offsets, len(plan.decodes))
        if plan.decodes:
            meta.decodes = self._decodes(plan)
        start = len(plan.decodes)
        for c in plan.spans:
            meta.spans.append(self._span(c, start))
            start += len(c.token_ids)
        return meta

    def _decodes(self, plan: SchedulerOutput):
        lay = self.layout
        tables = _padded_tables([c.block_ids for c in plan.decodes])
        ctx = torch.tensor([c.start_pos + 1 for c in plan.decodes])
        keys = torch.arange(tables.shape[1] * lay.block_size)[None, :]
        valid = keys < ctx[:, None]
        decodes = TorchDecodes(head_block_rows(tables, lay.num_kv_heads).to(lay.device), _bias(valid, lay))
        window = lay.sliding_window
        if window is not None and int(ctx.max()) > window:   # the query sits at ctx - 1
            decodes.window_bias = _bias(valid & (keys > ctx[:, None] - 1 - window), lay)
        return decodes

    def _span(self, c, start: int) -> SpanAttention:
        lay = self.layout
        n, k = len(c.token_ids), c.num_draft_tokens
        ctx_len = c.start_pos + n
        mask = None
        if c.start_pos > 0 or k:  # earlier KV exists, or a draft tree: causal with an offset, tree for drafts
            mask = torch.arange(ctx_len)[None, :] <= (c.start_pos + torch.arange(n))[:, None]
            if k:
                mask[n - k:, ctx_len - k:] = tree_mask(c.draft_parents)
            mask = mask.to(lay.device)
        table = torch.tensor(c.block_ids[:-(-ctx_len // lay.block_size)])
        span = SpanAttention(start, n, ctx_len, head_block_rows(table, lay.num_kv_heads).to(lay.device), mask)
        window = lay.sliding_window
        if window is not None and ctx_len > window:   # some query has keys outside its window
            # By position, not slot: a draft's position is its depth past the last committed token.
            committed = n - k
            q_pos = torch.arange(c.start_pos, c.start_pos + committed)
            if k:
                q_pos = torch.cat((q_pos, c.start_pos + committed - 1 + torch.tensor(tree_depths(c.draft_parents))))
            in_window = torch.arange(ctx_len)[None, :] > (q_pos - window)[:, None]
            causal = mask if mask is not None else (torch.arange(ctx_len)[None, :] <= q_pos[:, None]).to(lay.device)
            span.window_mask = causal & in_window.to(lay.device)
        return span

    def decode(self, q: torch.Tensor, layer_kv, meta: AttentionMetadata, scale: float,
               sliding: bool = False) -> torch.Tensor:
        nd, num_heads, head_dim = q.shape
        ctx_k, ctx_v = layer_kv.decode_context(meta.decodes)                              # [nd, kvh, L, D]
        kvh = ctx_k.shape[1]
        qd = q.view(nd, kvh, num_heads // kvh, head_dim)
        bias = meta.decodes.window_bias if sliding and meta.decodes.window_bias is not None else meta.decodes.bias
        scores = torch.matmul(qd, ctx_k.transpose(-1, -2)).mul_(scale).add_(bias)         # [nd, kvh, G, L]
        return torch.matmul(torch.softmax(scores, dim=-1), ctx_v).view(nd, num_heads, head_dim)


class NativeAttention(TorchAttention):
    """Decode rows through the native paged-attention kernel, reading the blocks in place. Over a float pool
    (prefix_rows) every span token is one more such row over its own prefix, so a token's attention is the
    same float operations whether it comes in a prompt chunk of any size, a draft tree or a decode step:
    SDPA's result depends on the chunk's shape, and with int8 activations those last-bit differences
    change tokens. Over an int8 pool spans go through SDPA on the dequantized context."""

    name = "native"

    def __init__(self, block_size: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device,
                 prefix_rows: bool = True, sliding_window: int | None = None):
        # Every row is a kernel call that takes the window itself: no window masks to build.
        super().__init__(block_size, num_kv_heads, dtype, device)
        if sliding_window is not None and not prefix_rows:
            raise ValueError("sliding-window layers on the native backend need every span token as a row")
        self.prefix_rows = prefix_rows
        self.window = sliding_window or 0

    def _span(self, c, start: int) -> SpanAttention:
        span = super()._span(c, start)
        if self.prefix_rows:
            n, k = len(c.token_ids), c.num_draft_tokens
            table = torch.tensor(c.block_ids[:-(-(c.start_pos + n) // self.layout.block_size)])
            masks = (torch.tensor([-1] * (n - k) + tree_visibility_bits(c.draft_parents), dtype=torch.long)
                     if k else None)
            span.rows = NativeDecodes(table.expand(n, -1).contiguous().to(self.layout.device),
                                      torch.arange(c.start_pos + 1, c.start_pos + n + 1).to(self.layout.device),
                                      masks=None if masks is None else masks.to(self.layout.device))
            span.causal_mask = None     # not read
        return span

    def _decodes(self, plan: SchedulerOutput):
        tables = _padded_tables([c.block_ids for c in plan.decodes]).to(self.layout.device)
        return NativeDecodes(tables, torch.tensor([c.start_pos + 1 for c in plan.decodes]).to(self.layout.device))

    def decode(self, q: torch.Tensor, layer_kv, meta: AttentionMetadata, scale: float,
               sliding: bool = False) -> torch.Tensor:
        if sliding:
            return layer_kv.decode_attention(q, meta.decodes, scale, window=self.sliding_window_size())
        return layer_kv.decode_attention(q, meta.decodes, scale)

    def sliding_window_size(self) -> int:
        if not self.window:
            raise RuntimeError("a sliding layer on a native backend built without the model's window")
        return self.window


class DecodeStackAttention:
    """Steps of decodes and short draft trees: every decoder layer in one native call (models/decode_stack.py).
    Each query row is a decode over its own prefix; a draft row carries a mask of the drafts it sees."""

    name = "decode-stack"

    def __init__(self, stack, block_size: int, device: torch.device, int8_kv=None):
        self.stack = stack
        self.block_size, self.device = block_size, device
        self.int8_kv = int8_kv                    # the Int8KVCache the stack reads, if the pool is int8
        self._staging_slots = 0
        self._sync_int8_staging()

    def _sync_int8_staging(self) -> None:
        """Hand the stack the int8 pools' scales and key staging; again after the staging grew (new tensors)."""
        kv = self.int8_kv
        if kv is not None and kv.num_slots != self._staging_slots:
            self.stack.set_int8_kv([l.k_scale for l in kv.layers], [l.v_scale for l in kv.layers],
                                   [l.k_stage for l in kv.layers])
            self._staging_slots = kv.num_slots

    def supports(self, plan: SchedulerOutput) -> bool:
        if self.int8_kv is not None:              # draft trees over int8 KV take the module path
            return not plan.spans
        return all(c.num_draft_tokens and len(c.token_ids) <= STACK_MAX_CHUNK for c in plan.spans)

    def build(self, plan: SchedulerOutput) -> AttentionMetadata:
        blocks, offsets = _writes(plan, self.block_size, self.device)
        tables: list[list[int]] = []
        lens: list[int] = []
        masks: list[int] = []
        for c in plan.decodes:
            tables.append(c.block_ids)
            lens.append(c.start_pos + 1)
            masks.append(-1)
        for c in plan.spans:
            committed = len(c.token_ids) - c.num_draft_tokens
            for i in range(len(c.token_ids)):   # drafts sit in the slots after the committed tokens
                tables.append(c.block_ids)
                lens.append(c.start_pos + i + 1)
            masks.extend([-1] * committed)
            masks.extend(tree_visibility_bits(c.draft_parents))
        # Plain decodes see their whole context: no masks to read.
        row_masks = torch.tensor(masks, dtype=torch.long).to(self.device) if plan.spans else None
        rows = StackRows(_padded_tables(tables).to(self.device), torch.tensor(lens).to(self.device), row_masks)
        return AttentionMetadata(self, blocks, offsets, len(plan.decodes), rows=rows)

    def run_layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata):
        r = meta.rows
        self._sync_int8_staging()                 # prepare() may have grown the staging this step
        return self.stack.forward(h, cos, sin, meta.write_blocks, meta.write_offsets, r.tables, r.lens, r.masks,
                                  meta.write_slots, r.slots, meta.lora_slots)

    def decode(self, q, layer_kv, meta, scale, sliding=False):
        raise RuntimeError("the decode stack runs whole steps; it has no per-layer decode")


def paged_attention(q: torch.Tensor, kv, meta: AttentionMetadata, scale: float, sliding: bool = False) -> torch.Tensor:
    """One layer's attention on the module path. q: [T, heads, head_dim]; kv: the layer's cache.
    sliding: the layer attends within the model's sliding window (the step's window masks)."""
    num_heads = q.shape[1]
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = meta.backend.decode(q[:nd], kv, meta, scale, sliding)
    for span in meta.spans:
        s, n, L = span.start, span.length, span.context_len
        if span.rows is not None:
            window = {"window": meta.backend.sliding_window_size()} if sliding else {}
            out[s:s + n] = kv.decode_attention(q[s:s + n], span.rows, scale, **window)
            continue
        kc, vc = kv.chunk_context(span)                                                  # [kvh, blocks*bs, D]
        qc = q[s:s + n].transpose(0, 1).unsqueeze(0)                                     # [1, H, n, D]
        mask = span.window_mask if sliding and span.window_mask is not None else span.causal_mask
        o = F.scaled_dot_product_attention(qc, kc[:, :L].unsqueeze(0), vc[:, :L].unsqueeze(0),
                                           attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=kc.shape[0] != num_heads)
        out[s:s + n] = o[0].transpose(0, 1)
    return out
