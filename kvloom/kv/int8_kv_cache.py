"""The int8 KV pool: keys per channel, values per token, scales per block (`--kv-cache-dtype int8`).

Keys carry a few outlier channels that are large in every token (KVQuant), so
one scale per channel over a block's rows keeps the small channels precise;
values have no such structure and take one scale per token, fixed when the
token is written. A per-channel scale needs all of a block's keys, so keys
first land in float *staging* (KIVI's full-precision tail) and the block is
*sealed* (quantized once, from exact values) when every row holds a committed
token. The stored bytes therefore do not depend on how a block was filled
(one prompt chunk or sixteen decodes): batching and chunking never change
what a request reads back.

Staging slots are shared by all layers and handed out per block: a running
request owns one open block, a prompt chunk the blocks it writes. The slot
table grows on demand; its first `capacity` slots are counted in the KV budget.
"""
from __future__ import annotations

import logging

import torch

from kvloom.kernels import kernels
from kvloom.models.llama import LlamaShape
from kvloom.attention.metadata import AttentionMetadata, NativeDecodes, SpanAttention, TorchDecodes, staging_slots

log = logging.getLogger(__name__)

_EPS = 1e-8


def int8_kv_bytes_per_token(shape: LlamaShape, dtype: torch.dtype, block_size: int) -> float:
    """int8 K and V, a K scale per channel per block and a V scale per token, all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    width = shape.num_kv_heads * shape.head_dim
    return shape.num_layers * (2 * width + width * elem / block_size + shape.num_kv_heads * elem)


def staging_bytes_per_slot(shape: LlamaShape, dtype: torch.dtype, block_size: int) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return shape.num_layers * shape.num_kv_heads * block_size * shape.head_dim * elem


def quantize_rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per slice along `dim` (the reduced dimension is kept in the scale)."""
    scale = x.abs().amax(dim, keepdim=True).clamp_min(_EPS) / 127.0
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


class Int8LayerKV:
    def __init__(self, num_blocks: int, shape: LlamaShape, block_size: int, dtype: torch.dtype,
                 device: torch.device, num_slots: int):
        kvh, d = shape.num_kv_heads, shape.head_dim
        self.block_size, self.head_dim, self.dtype = block_size, d, dtype
        self.k = torch.zeros(num_blocks, kvh, block_size, d, dtype=torch.int8, device=device)
        self.k_scale = torch.zeros(num_blocks, kvh, d, dtype=dtype, device=device)
        self.v = torch.zeros(num_blocks, kvh, block_size, d, dtype=torch.int8, device=device)
        self.v_scale = torch.zeros(num_blocks, kvh, block_size, dtype=dtype, device=device)
        self.k_stage = torch.zeros(num_slots, kvh, block_size, d, dtype=dtype, device=device)

    def grow_staging(self, num_slots: int) -> None:
        extra = self.k_stage.new_zeros((num_slots - self.k_stage.shape[0], *self.k_stage.shape[1:]))
        self.k_stage = torch.cat([self.k_stage, extra])

    def write(self, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        self.k_stage[meta.write_slots, :, meta.write_offsets] = k
        vq, vs = quantize_rows(v, -1)
        self.v[meta.write_blocks, :, meta.write_offsets] = vq
        self.v_scale[meta.write_blocks, :, meta.write_offsets] = vs.squeeze(-1)

    def _dequantized(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [..., kv_heads, W] -> K, V as [..., kv_heads, W, block_size, head_dim]."""
        bs, d = self.block_size, self.head_dim
        k = self.k.view(-1, bs, d)[rows].to(self.dtype).mul_(self.k_scale.view(-1, d)[rows].unsqueeze(-2))
        v = self.v.view(-1, bs, d)[rows].to(self.dtype).mul_(self.v_scale.view(-1, bs)[rows].unsqueeze(-1))
        return k, v

    def decode_context(self, decodes: TorchDecodes) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._dequantized(decodes.head_blocks)
        if decodes.staged is not None:
            req, col, slot = decodes.staged
            k[req, :, col] = self.k_stage[slot]
        nd, kvh = k.shape[:2]
        return k.view(nd, kvh, -1, self.head_dim), v.view(nd, kvh, -1, self.head_dim)

    def decode_attention(self, q: torch.Tensor, decodes: NativeDecodes, scale: float) -> torch.Tensor:
        return kernels().decode_attention_i8(q.contiguous(), self.k, self.k_scale, self.v, self.v_scale, self.k_stage,
                                             decodes.tables, decodes.slots, decodes.lens, scale)

    def chunk_context(self, chunk: SpanAttention) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._dequantized(chunk.head_blocks)
        if chunk.staged is not None:
            col, slot = chunk.staged
            k[:, col] = self.k_stage[slot].transpose(0, 1)
        kvh = k.shape[0]
        return k.view(kvh, -1, self.head_dim), v.view(kvh, -1, self.head_dim)

    def seal(self, blocks: torch.Tensor, slots: torch.Tensor) -> None:
        kq, ks = quantize_rows(self.k_stage[slots], 2)       # one scale per (block, head, channel)
        self.k[blocks] = kq
        self.k_scale[blocks] = ks.squeeze(2)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for t in (self.k, self.k_scale, self.v, self.v_scale):
            t.index_copy_(0, dst, t[src])

    def copy_staging(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        self.k_stage.index_copy_(0, dst_slots, self.k_stage[src_slots])


class Int8KVCache:
    """All layers' int8 pools and the staging slots they share."""

    def __init__(self, num_blocks: int, shape: LlamaShape, block_size: int, dtype: torch.dtype,
                 device: torch.device, staging_capacity: int):
        self.block_size = block_size
        self.device = device
        self.layers = [Int8LayerKV(num_blocks, shape, block_size, dtype, device, staging_capacity)
                       for _ in range(shape.num_layers)]
        self.num_slots = staging_capacity
        self._slot_of: dict[int, int] = {}
        self._free_slots = list(range(staging_capacity - 1, -1, -1))
        self.layout = {"kind": "int8", "dtype": str(dtype), "block_size": block_size,
                       "num_layers": shape.num_layers, "kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim}

    # ---- block I/O (moving requests between engines) --------------------------------------

    _BLOCK_TENSORS = ("k", "k_scale", "v", "v_scale")

    def read_blocks(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        """Copies of the blocks' int8 K/V and scales, every layer stacked first; for blocks still open, their
        float-staged keys ("k_stage", with "staged": the positions in `blocks` they belong to)."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        out = {name: torch.stack([getattr(layer, name)[idx] for layer in self.layers]).cpu()
               for name in self._BLOCK_TENSORS}
        staged = [i for i, b in enumerate(blocks) if b in self._slot_of]
        out["staged"] = torch.tensor(staged, dtype=torch.long)
        if staged:
            slots = torch.tensor([self._slot_of[blocks[i]] for i in staged], device=self.device)
            out["k_stage"] = torch.stack([layer.k_stage[slots] for layer in self.layers]).cpu()
        return out

    def write_blocks(self, blocks: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Store blocks read by read_blocks into these (freshly allocated) blocks; open ones get a staging slot."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for i, layer in enumerate(self.layers):
            for name in self._BLOCK_TENSORS:
                getattr(layer, name).index_copy_(0, idx, tensors[name][i].to(self.device))
        staged = tensors["staged"].tolist()
        if staged:
            slots = torch.tensor([self._ensure_slot(blocks[i]) for i in staged], device=self.device)
            for i, layer in enumerate(self.layers):
                layer.k_stage.index_copy_(0, slots, tensors["k_stage"][i].to(self.device))

    @property
    def num_staged(self) -> int:
        return len(self._slot_of)

    def _ensure_slot(self, block: int) -> int:
        slot = self._slot_of.get(block)
        if slot is None:
            if not self._free_slots:
                grown = 2 * self.num_slots
                log.info("int8 KV: %d blocks open at once; staging grows to %d slots", self.num_slots, grown)
                for layer in self.layers:
                    layer.grow_staging(grown)
                self._free_slots = list(range(grown - 1, self.num_slots - 1, -1))
                self.num_slots = grown
            slot = self._slot_of[block] = self._free_slots.pop()
        return slot

    def _drop_slot(self, block: int) -> None:
        slot = self._slot_of.pop(block, None)
        if slot is not None:
            self._free_slots.append(slot)

    def prepare(self, chunks, meta: AttentionMetadata) -> list[int]:
        """Give every written block a staging slot and tell attention which context blocks are staged.

        Returns the blocks to seal after the pass: staged blocks whose every row holds a committed token.
        """
        bs = self.block_size
        write_slots: list[int] = []
        staged_decode: list[tuple[int, int, int]] = []
        to_seal: dict[int, None] = {}
        span_index = 0
        for i, c in enumerate(chunks):
            start, end = c.start_pos, c.start_pos + len(c.token_ids)
            for p in range(start, end):
                write_slots.append(self._ensure_slot(c.block_ids[p // bs]))
            staged = [(j, self._slot_of[b]) for j, b in enumerate(c.block_ids[:-(-end // bs)]) if b in self._slot_of]
            committed_full = (end - c.num_draft_tokens) // bs
            to_seal.update((c.block_ids[j], None) for j, _ in staged if j < committed_full)
            if i < meta.num_decodes:
                staged_decode.extend((i, j, s) for j, s in staged)
            else:
                chunk = meta.spans[span_index]
                span_index += 1
                if staged:
                    chunk.staged = tuple(torch.tensor(x, device=self.device) for x in zip(*staged))
        meta.write_slots = torch.tensor(write_slots, dtype=torch.long, device=self.device)
        if meta.decodes is not None:
            meta.decodes.add_staging(staged_decode, self.device)
        if meta.rows is not None:           # the decode stack: one row a decode (it takes no prompt spans)
            meta.rows.slots = staging_slots(meta.rows.tables.shape, staged_decode, self.device)
        return list(to_seal)

    def seal(self, blocks: list[int]) -> None:
        if not blocks:
            return
        slots = torch.tensor([self._slot_of[b] for b in blocks], device=self.device)
        dst = torch.tensor(blocks, device=self.device)
        for layer in self.layers:
            layer.seal(dst, slots)
        for b in blocks:
            self._drop_slot(b)

    @torch.inference_mode()
    def release(self, block: int, holds_full_content: bool) -> None:
        """The block left every sequence. Full content may still be hit by the prefix cache: seal it."""
        if block in self._slot_of:
            if holds_full_content:
                self.seal([block])
            else:
                self._drop_slot(block)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of shared blocks: staged keys go to the copy's own slot, sealed ones stay int8."""
        for src, dst in copies:
            self._drop_slot(dst)
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for layer in self.layers:
            layer.copy_blocks(src, dst)
        staged = [(self._slot_of[s], self._ensure_slot(d)) for s, d in copies if s in self._slot_of]
        if staged:
            s_slots, d_slots = (torch.tensor(x, device=self.device) for x in zip(*staged))
            for layer in self.layers:
                layer.copy_staging(s_slots, d_slots)
