"""`kvloom eval perplexity`: next-token perplexity on English text that ships with Python.

Deterministic: the same corpus tokens (pydoc_data.topics), cut into
non-overlapping windows, each scored from an empty context through the
engine's own runner and KV pool, so quantized weights and KV are measured as served.
A window goes through in chunks (block_size tokens by default), as chunked
prefill and decoding do: every chunk reads the KV of the earlier ones back
from the pool, so an int8 KV cache is in the measurement. (One pass over the
whole window would attend to its own keys and values in full precision.)
"""
from __future__ import annotations

import math

import torch

from kvloom.corpus import corpus_token_ids
from kvloom.engine.engine import Engine
from kvloom.engine.window_logits import window_logits


def perplexity(engine: Engine, num_tokens: int = 4096, window: int = 512, chunk: int | None = None) -> dict:
    ids = corpus_token_ids(engine.tokenizer, max_tokens=num_tokens)
    window = min(window, engine.max_model_len)
    chunk = chunk or engine.config.block_size
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        ids_w = ids[start:start + window]
        if len(ids_w) < 2:
            break
        logits = window_logits(engine, ids_w, chunk).float()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(ids_w[1:])
        nll -= logp.gather(1, targets[:, None]).sum().item()
        count += len(ids_w) - 1
    return {"perplexity": math.exp(nll / count), "tokens_scored": count, "window": window, "chunk": chunk,
            "corpus": "pydoc_data.topics"}
