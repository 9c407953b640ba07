"""`kvloom eval perplexity`: next-token perplexity on English text that ships with Python.

Deterministic: the same corpus tokens (pydoc_data.topics), cut into
non-overlapping windows, each scored from an empty context through the
engine's own runner and KV pool, so quantized weights and KV are measured as served.
"""
from __future__ import annotations

import math

import torch

from kvloom.bench.prompts import corpus_token_ids
from kvloom.engine.engine import Engine
from kvloom.engine.scheduler_output import ScheduledChunk, SchedulerOutput


def window_logits(engine: Engine, token_ids: list[int]) -> torch.Tensor:
    """Logits at every position of one window, computed as one prompt in the paged KV pool."""
    bs = engine.config.block_size
    blocks = engine.pool.allocate(-(-len(token_ids) // bs))
    if blocks is None:
        raise ValueError("the KV pool is too small for one evaluation window; lower --window")
    try:
        plan = SchedulerOutput(prefills=[ScheduledChunk("eval", token_ids, 0, blocks, sample=True)])
        return engine.runner.execute(plan, all_logits=True)
    finally:
        engine.pool.free(blocks)


def perplexity(engine: Engine, num_tokens: int = 4096, window: int = 512) -> dict:
    ids = corpus_token_ids(engine.tokenizer, max_tokens=num_tokens)
    window = min(window, engine.max_model_len)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = window_logits(engine, chunk).float()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(chunk[1:])
        nll -= logp.gather(1, targets[:, None]).sum().item()
        count += len(chunk) - 1
    return {"perplexity": math.exp(nll / count), "tokens_scored": count, "window": window,
            "corpus": "pydoc_data.topics"}
