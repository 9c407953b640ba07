"""Executes a SchedulerOutput: builds the flat batch, runs the model, returns logits.

Owns the model and the physical KV tensors. Knows block ids, never requests.
"""
from __future__ import annotations

import torch

from kvloom.engine.scheduler_output import SchedulerOutput
from kvloom.kv.kv_cache import allocate_kv_cache
from kvloom.models.llama import LlamaForCausalLM
from kvloom.models.paged_attention import AttentionMetadata, PrefillChunk


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.kv_caches = allocate_kv_cache(num_blocks, block_size, model.shape, dtype, self.device)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> torch.Tensor:
        """Logits [num sampled chunks, vocab], in plan.chunks order of the chunks with sample=True."""
        if plan.copies:
            self._copy_blocks(plan.copies)
        input_ids, positions, meta, logits_indices = self._prepare(plan)
        return self.model(input_ids, positions, meta, self.kv_caches, logits_indices)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate shared blocks before this step writes into the copies."""
        bs = self.block_size
        offsets = torch.arange(bs)
        src = torch.cat([offsets + s * bs for s, _ in copies]).to(self.device)
        dst = torch.cat([offsets + d * bs for _, d in copies]).to(self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache[src])
            v_cache.index_copy_(0, dst, v_cache[src])

    def _prepare(self, plan: SchedulerOutput):
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        for c in plan.decodes:
            p = c.start_pos
            ids.append(c.token_ids[0])
            pos.append(p)
            slots.append(c.block_ids[p // bs] * bs + p % bs)
            logits_indices.append(len(ids) - 1)

        decode_tables = decode_bias = None
        if plan.decodes:
            width = max(len(c.block_ids) for c in plan.decodes)
            tables = [c.block_ids + [0] * (width - len(c.block_ids)) for c in plan.decodes]
            decode_tables = torch.tensor(tables, dtype=torch.long)
            ctx = torch.tensor([c.start_pos + 1 for c in plan.decodes])
            valid = torch.arange(width * bs)[None, :] < ctx[:, None]
            decode_bias = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))[:, None, None, :]

        prefills: list[PrefillChunk] = []
        for c in plan.prefills:
            n, start = len(c.token_ids), c.start_pos
            ctx_len = start + n
            ctx_pos = torch.arange(ctx_len)
            table = torch.tensor(c.block_ids, dtype=torch.long)
            ctx_slots = table[ctx_pos // bs] * bs + ctx_pos % bs
            mask = None
            if start > 0:  # earlier KV exists: causal with an offset
                mask = ctx_pos[None, :] <= (start + torch.arange(n))[:, None]
            prefills.append(PrefillChunk(len(ids), n, ctx_slots, mask))
            ids.extend(c.token_ids)
            pos.extend(range(start, ctx_len))
            slots.extend(ctx_slots[start:].tolist())
            if c.sample:
                logits_indices.append(len(ids) - 1)

        dtype = self.model.embed_tokens.weight.dtype
        if decode_bias is not None:
            decode_bias = decode_bias.to(dtype)
        dev = self.device
        for chunk in prefills:
            chunk.context_slots = chunk.context_slots.to(dev)
            chunk.causal_mask = None if chunk.causal_mask is None else chunk.causal_mask.to(dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(plan.decodes),
            decode_block_tables=None if decode_tables is None else decode_tables.to(dev),
            decode_bias=None if decode_bias is None else decode_bias.to(dev),
            prefills=prefills,
        )
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                meta, torch.tensor(logits_indices, dtype=torch.long, device=dev))
