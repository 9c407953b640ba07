"""Logits at every position of a token window, computed through the engine's runner and KV pool.

Shared by w8a8 calibration (quant/calibration.py) and `kvloom eval perplexity`: both
must see the model exactly as it serves, KV read back from the pool included.
"""
from __future__ import annotations

import torch

from kvloom.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from kvloom.kv.window_pages import allocate_scratch, free_scratch


def window_logits(engine, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """Logits at every position of one window, computed as one prompt in the paged KV pool,
    `chunk` tokens per forward pass (default: all at once)."""
    bs = engine.config.block_size
    chunk = chunk or len(token_ids)
    blocks = allocate_scratch(engine.pool, engine.window_pages, -(-len(token_ids) // bs))
    if blocks is None:
        raise ValueError("the KV pool is too small for one evaluation window; lower --window")
    try:
        logits = []
        for start in range(0, len(token_ids), chunk):
            ids = token_ids[start:start + chunk]
            plan = SchedulerOutput(spans=[ScheduledChunk("eval", ids, start, blocks, sample=True)])
            logits.append(engine.runner.logits(plan, all_logits=True))
        return torch.cat(logits)
    finally:
        free_scratch(engine.pool, engine.window_pages, blocks)
