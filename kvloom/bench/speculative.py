"""`kvloom bench spec`: decoding speed with and without lookahead speculation, side by side in one run.

The same workload's requests go through two engines built from the same
settings, one with `speculative="lookahead"`, at a fixed concurrency (a
closed loop: a new request starts when one finishes). Each engine first
serves a warm-up set, so neither pays first-call costs in a timed round.
Every round then draws new prompts, served by both engines, in alternating
order: lookahead's global trie has seen earlier rounds' outputs, never
continuations of these prompts, as in a server that has been running a
while. Decode speed is output tokens after the first over the time after the
first token, summed over requests (per request: at concurrency 1 the batch-1
decode speed); throughput is output tokens over wall time. Both are summed
over all rounds; the ratio of each round is reported too.
"""
from __future__ import annotations

import dataclasses
import statistics

from kvloom.bench.closed_loop import run_closed_loop
from kvloom.bench.workloads import synthetic_workload
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.system_info import engine_description

_WARM_UP_SEED = 10_000   # the warm-up set's prompts, apart from every round's (seeds 0, 1, ...)


def _run(engine: Engine, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    wall, times = run_closed_loop(engine, prompts, output_len, concurrency)
    return {"output_tokens": sum(t.num_tokens for t in times), "requests": len(times), "wall_s": wall,
            "decode_s": sum(t.last_token - t.first_token for t in times)}


def _speeds(runs: list[dict]) -> dict:
    produced, requests = sum(r["output_tokens"] for r in runs), sum(r["requests"] for r in runs)
    wall, decode = sum(r["wall_s"] for r in runs), sum(r["decode_s"] for r in runs)
    return {"output_tokens": produced, "wall_s": wall, "throughput_tokens_per_s": produced / wall,
            "decode_tokens_per_s_per_request": (produced - requests) / decode if decode else 0.0}


def run_spec_comparison(config: EngineConfig, workload: str, num_requests: int, input_len: int,
                        output_len: int, concurrency: int, rounds: int = 2) -> dict:
    plain = Engine(dataclasses.replace(config, speculative="none"))
    spec = Engine(dataclasses.replace(config, speculative="lookahead"))

    def prompts(seed: int, n: int) -> list[list[int]]:
        wl = synthetic_workload(plain.tokenizer, workload, n, float("inf"), 1.0, input_len, output_len,
                                0.0, plain.max_model_len, seed=seed)
        return [r.prompt for r in wl.requests]

    warm = prompts(_WARM_UP_SEED, min(num_requests, concurrency))
    for engine in (plain, spec):
        _run(engine, warm, min(output_len, 16), concurrency)
    runs: dict[str, list[dict]] = {"none": [], "lookahead": []}
    per_round: list[dict] = []
    for r in range(rounds):
        round_prompts = prompts(r, num_requests)
        order = [("none", plain), ("lookahead", spec)]
        for name, engine in order if r % 2 == 0 else order[::-1]:
            runs[name].append(_run(engine, round_prompts, output_len, concurrency))
        tput = {name: _speeds(runs[name][-1:])["throughput_tokens_per_s"] for name in runs}
        per_round.append({"none": round(tput["none"], 1), "lookahead": round(tput["lookahead"], 1),
                          "ratio": round(tput["lookahead"] / tput["none"], 3)})
    none, look = _speeds(runs["none"]), _speeds(runs["lookahead"])
    look["speculation"] = spec.speculator.stats()
    return {"workload": workload, "num_requests": num_requests, "concurrency": concurrency,
            "output_len": output_len, "rounds": rounds, "none": none, "lookahead": look,
            "decode_speedup": look["decode_tokens_per_s_per_request"] / none["decode_tokens_per_s_per_request"],
            "throughput_speedup": look["throughput_tokens_per_s"] / none["throughput_tokens_per_s"],
            "median_round_ratio": statistics.median(r["ratio"] for r in per_round),
            "throughput_per_round": per_round, "system": engine_description(spec)}
