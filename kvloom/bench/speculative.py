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

from kvloom.bench.closed_loop import run_closed_loop
from kvloom.bench.workloads import synthetic_workload
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.system_info import engine_description


def _run(engine: Engine, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    wall, times = run_closed_loop(engine, prompts, output_len, concurrency)
    produced = sum(t.num_tokens for t in times)
    decode_time = sum(t.last_token - t.first_token for t in times)
    return {"output_tokens": produced, "wall_s": wall, "throughput_tokens_per_s": produced / wall,
            "decode_tokens_per_s_per_request": (produced - len(times)) / decode_time if decode_time else 0.0}


def run_spec_comparison(config: EngineConfig, workload: str, num_requests: int, input_len: int,
                        output_len: int, concurrency: int, rounds: int = 2) -> dict:
    plain = Engine(dataclasses.replace(config, speculative="none"))
    spec = Engine(dataclasses.replace(config, speculative="lookahead"))
    wl = synthetic_workload(plain.tokenizer, workload, num_requests, float("inf"), 1.0, input_len, output_len,
                            0.0, plain.max_model_len, seed=0)
    prompts = [r.prompt for r in wl.requests]
    best: dict[str, dict] = {}
    per_round: list[dict] = []
    for _ in range(rounds):
        per_round.append({})
        for name, engine in (("none", plain), ("lookahead", spec)):
            r = _run(engine, prompts, output_len, concurrency)
            per_round[-1][name] = round(r["throughput_tokens_per_s"], 1)
            if name not in best or r["throughput_tokens_per_s"] > best[name]["throughput_tokens_per_s"]:
                best[name] = r
    best["lookahead"]["speculation"] = spec.speculator.stats()
    return {"workload": workload, "num_requests": num_requests, "concurrency": concurrency,
            "output_len": output_len, "rounds": rounds, "none": best["none"], "lookahead": best["lookahead"],
            "decode_speedup": (best["lookahead"]["decode_tokens_per_s_per_request"]
                               / best["none"]["decode_tokens_per_s_per_request"]),
            "throughput_speedup": (best["lookahead"]["throughput_tokens_per_s"]
                                   / best["none"]["throughput_tokens_per_s"]),
            "throughput_per_round": per_round, "system": engine_description(spec)}
