"""Executes a SchedulerOutput: builds the flat batch, runs the model, returns logits.

Owns the model and the physical KV tensors. Knows block ids, never requests.
"""
from __future__ import annotations

import torch

from kvloom.engine.scheduler_output import SchedulerOutput
from kvloom.kv.kv_cache import allocate_kv_cache
from kvloom.models.llama import LlamaForCausalLM
from kvloom.models.paged_attention import AttentionMetadata, PrefillChunk, head_block_rows


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.kv_caches = allocate_kv_cache(num_blocks, block_size, model.shape, dtype, self.device)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput, all_logits: bool = False) -> torch.Tensor:
        """Logits [num sampled chunks, vocab], in plan.chunks order of the chunks with sample=True
        (with all_logits: one row for every token of the batch, for evaluation)."""
        if plan.copies:
            self._copy_blocks(plan.copies)
        input_ids, positions, meta, logits_indices = self._prepare(plan)
        if all_logits:
            logits_indices = torch.arange(len(input_ids), device=self.device)
        return self.model(input_ids, positions, meta, self.kv_caches, logits_indices)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate shared blocks before this step writes into the copies."""
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache[src])
            v_cache.index_copy_(0, dst, v_cache[src])

    def _prepare(self, plan: SchedulerOutput):
        bs = self.block_size
        kvh = self.model.shape.num_kv_heads
        dev = self.device
        ids: list[int] = []
        pos: list[int] = []
        logits_indices: list[int] = []
        for c in plan.decodes:
            ids.append(c.token_ids[0])
            pos.append(c.start_pos)
            logits_indices.append(len(ids) - 1)

        decode_rows = decode_bias = None
        if plan.decodes:
            width = max(len(c.block_ids) for c in plan.decodes)
            tables = torch.tensor([c.block_ids + [0] * (width - len(c.block_ids)) for c in plan.decodes])
            decode_rows = head_block_rows(tables, kvh).to(dev)
            ctx = torch.tensor([c.start_pos + 1 for c in plan.decodes])
            valid = torch.arange(width * bs)[None, :] < ctx[:, None]
            dtype = self.model.embed_tokens.weight.dtype
            decode_bias = torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, float("-inf"))[:, None, None, :]
            decode_bias = decode_bias.to(dev)

        prefills: list[PrefillChunk] = []
        for c in plan.prefills:
            n, start = len(c.token_ids), c.start_pos
            ctx_len = start + n
            mask = None
            if start > 0:  # earlier KV exists: causal with an offset
                mask = (torch.arange(ctx_len)[None, :] <= (start + torch.arange(n))[:, None]).to(dev)
            table = torch.tensor(c.block_ids[:-(-ctx_len // bs)])
            prefills.append(PrefillChunk(len(ids), n, ctx_len, head_block_rows(table, kvh).to(dev), mask))
            ids.extend(c.token_ids)
            pos.extend(range(start, ctx_len))
            if c.sample:
                logits_indices.append(len(ids) - 1)

        positions = torch.tensor(pos, dtype=torch.long)
        write_blocks = torch.tensor([c.block_ids[p // bs] for c in plan.chunks
                                     for p in range(c.start_pos, c.start_pos + len(c.token_ids))])
        meta = AttentionMetadata(
            write_blocks=write_blocks.to(dev),
            write_offsets=(positions % bs).to(dev),
            num_decodes=len(plan.decodes),
            decode_head_blocks=decode_rows,
            decode_bias=decode_bias,
            prefills=prefills,
        )
        return (torch.tensor(ids, dtype=torch.long, device=dev), positions.to(dev), meta,
                torch.tensor(logits_indices, dtype=torch.long, device=dev))
