"""`kvloom bench prefix`: what prefix caching and agent sessions save, measured on the engine.

shared-prefix: requests that share a long system prompt arrive one after another.
agent: several agent programs take turns; each turn appends a tool result to
everything before it, and other traffic runs while the tools do. TTFT is
measured per request: from add_request to its first token.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from kvloom.corpus import corpus_token_ids
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.sampling_params import SamplingParams


def _run_one(engine: Engine, prompt: list[int], params: SamplingParams, session_id: str | None = None):
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, params, session_id=session_id)
    ttft, final = None, None
    while engine.has_unfinished():
        for out in engine.step():
            if out.parent_id == rid and ttft is None and out.token_ids:
                ttft = time.perf_counter() - t0
            if out.finished and out.parent_id == rid:
                final = out
    return ttft, final


def _stats(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1e3
    return {"p50_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
            "n": len(xs)}


def shared_prefix(config: EngineConfig, prefix_len: int, suffix_len: int, num_requests: int,
                  output_len: int) -> dict:
    result = {}
    for label, caching in (("caching off", False), ("caching on", True)):
        engine = Engine(EngineConfig(**{**vars(config), "enable_prefix_caching": caching}))
        ids = corpus_token_ids(engine.tokenizer)
        prefix = ids[:prefix_len]
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        ttfts, cached, t0 = [], [], time.perf_counter()
        for k in range(num_requests):
            suffix = ids[prefix_len + 997 * (k + 1): prefix_len + 997 * (k + 1) + suffix_len]
            ttft, out = _run_one(engine, prefix + suffix, params)
            ttfts.append(ttft)
            cached.append(out.num_cached_tokens)
        elapsed = time.perf_counter() - t0
        result[label] = {"ttft_first": ttfts[0] * 1e3, "ttft_later": _stats(ttfts[1:]),
                         "cached_tokens_later": statistics.mean(cached[1:]),
                         "requests_per_s": num_requests / elapsed}
    off, on = result["caching off"]["ttft_later"]["p50_ms"], result["caching on"]["ttft_later"]["p50_ms"]
    result["ttft_speedup_p50"] = off / on
    return result


def agent_turns(config: EngineConfig, num_agents: int, turns: int, first_len: int, tool_len: int,
                output_len: int, traffic_per_turn: int, traffic_len: int) -> dict:
    result = {}
    for label, caching, sessions in (("caching off", False, False), ("caching on", True, False),
                                     ("caching on + sessions", True, True)):
        engine = Engine(EngineConfig(**{**vars(config), "enable_prefix_caching": caching}))
        ids = corpus_token_ids(engine.tokenizer)
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        history = {a: ids[a * 5000: a * 5000 + first_len] for a in range(num_agents)}
        later_ttfts, computed = [], []
        offset = 60000
        for turn in range(turns):
            for a in range(num_agents):
                ttft, out = _run_one(engine, history[a], params, f"agent-{a}" if sessions else None)
                if turn > 0:
                    later_ttfts.append(ttft)
                    computed.append(len(history[a]) - out.num_cached_tokens)
                tool = ids[offset: offset + tool_len]
                offset += tool_len
                history[a] = history[a] + out.token_ids + tool
                for _ in range(traffic_per_turn):   # other users' requests while the tool runs
                    _run_one(engine, ids[offset: offset + traffic_len], params)
                    offset += traffic_len
        result[label] = {"ttft_later_turns": _stats(later_ttfts),
                         "computed_prompt_tokens_per_later_turn": statistics.mean(computed),
                         "kv_pool_tokens": engine.kv_capacity_tokens}
    return result
