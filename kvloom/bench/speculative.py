"""`kvloom bench spec`: decoding speed with and without lookahead speculation, side by side in one run.

The same workload's requests go through two engines built from the same
settings, one with `speculative="lookahead"`, at a fixed concurrency (a
closed loop: a new request starts when one finishes). The engines take turns
(`--rounds`) so the machine's drift hits both alike. Decode speed is output
tokens after the first over the time after the first token, summed over
requests (per request: at concurrency 1 the batch-1 decode speed);
throughput is output tokens over wall time. The best round of each counts.
"""
from __future__ import annotations

import dataclasses
import time

from kvloom.bench.workloads import synthetic_workload
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.sampling_params import SamplingParams


def _run(engine: Engine, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    pending = list(prompts)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    count: dict[str, int] = {}
    t0 = time.perf_counter()
    in_flight = 0
    while pending or engine.has_unfinished():
        while pending and in_flight < concurrency:
            engine.add_request(pending.pop(0), params)
            in_flight += 1
        for out in engine.step():
            now = time.perf_counter()
            if out.delta_token_ids:
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
                count[out.request_id] = len(out.token_ids)
            if out.finished:
                in_flight -= 1
    wall = time.perf_counter() - t0
    decode_tokens = sum(n - 1 for n in count.values())
    decode_time = sum(last[r] - first[r] for r in count)
    return {"output_tokens": sum(count.values()), "wall_s": wall,
            "throughput_tokens_per_s": sum(count.values()) / wall,
            "decode_tokens_per_s_per_request": decode_tokens / decode_time if decode_time else 0.0}


def run_spec_comparison(config: EngineConfig, workload: str, num_requests: int, input_len: int,
                        output_len: int, concurrency: int, rounds: int = 2) -> dict:
    plain = Engine(dataclasses.replace(config, speculative="none"))
    spec = Engine(dataclasses.replace(config, speculative="lookahead"))
    wl = synthetic_workload(plain.tokenizer, workload, num_requests, float("inf"), 1.0, input_len, output_len,
                            0.0, plain.max_model_len, seed=0)
    prompts = [r.prompt for r in wl.requests]
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, engine in (("none", plain), ("lookahead", spec)):
            r = _run(engine, prompts, output_len, concurrency)
            if name not in best or r["throughput_tokens_per_s"] > best[name]["throughput_tokens_per_s"]:
                best[name] = r
    best["lookahead"]["speculation"] = spec.speculator.stats()
    return {"workload": workload, "num_requests": num_requests, "concurrency": concurrency,
            "output_len": output_len, "rounds": rounds, "none": best["none"], "lookahead": best["lookahead"],
            "decode_speedup": (best["lookahead"]["decode_tokens_per_s_per_request"]
                               / best["none"]["decode_tokens_per_s_per_request"]),
            "throughput_speedup": (best["lookahead"]["throughput_tokens_per_s"]
                                   / best["none"]["throughput_tokens_per_s"])}
