"""`kvloom tune`: sweep the scheduler's knobs on this machine for one workload and name the best.

Each setting of max_num_seqs x max_num_batched_tokens serves the same burst
of requests (all arriving at once, as `bench serve --request-rate inf` sends
them) through an engine built for that setting (the config stays frozen; what
depends on the limits, such as int8 staging and the step-cost model, is sized
for them). Reported per setting: output tokens/s, TTFT and
TPOT percentiles. The best is the highest throughput whose TPOT p99 meets
`--max-tpot-ms` (throughput landscapes are irregular, so this is measured,
not derived).
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from kvloom.bench.closed_loop import run_closed_loop
from kvloom.corpus import prompts_of_length
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine


def _burst(engine: Engine, prompts: list[list[int]], output_len: int) -> dict:
    wall, times = run_closed_loop(engine, prompts, output_len, concurrency=len(prompts))
    ttft = np.array([t.first_token - t.start for t in times]) * 1e3
    tpot = np.array([(t.last_token - t.first_token) / (t.num_tokens - 1) for t in times if t.num_tokens > 1]) * 1e3
    return {"output_tokens_per_s": sum(t.num_tokens for t in times) / wall, "wall_s": wall,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "tpot_p50_ms": float(np.percentile(tpot, 50)), "tpot_p99_ms": float(np.percentile(tpot, 99))}


def tune(config: EngineConfig, num_requests: int, input_len: int, output_len: int, seqs: list[int],
         budgets: list[int], max_tpot_ms: float | None) -> dict:
    grid = list(itertools.product(seqs, budgets))
    rows = []
    for max_seqs, budget in grid:
        engine = Engine(dataclasses.replace(config, max_num_seqs=max_seqs, max_num_batched_tokens=budget))
        prompts = prompts_of_length(engine.tokenizer, [input_len] * (num_requests + 2))
        _burst(engine, prompts[-2:], 4)    # warm-up
        rows.append({"max_num_seqs": max_seqs, "max_num_batched_tokens": budget,
                     **_burst(engine, prompts[:num_requests], output_len)})
        del engine
    ok = [r for r in rows if max_tpot_ms is None or r["tpot_p99_ms"] <= max_tpot_ms]
    best = max(ok, key=lambda r: r["output_tokens_per_s"]) if ok else None
    return {"num_requests": num_requests, "input_len": input_len, "output_len": output_len,
            "max_tpot_ms": max_tpot_ms, "results": rows, "best": best}


def format_tune(result: dict) -> str:
    lines = [f"{'seqs':>5} {'budget':>7} {'tok/s':>8} {'TTFT p50':>9} {'TPOT p50':>9} {'TPOT p99':>9}"]
    for r in result["results"]:
        lines.append(f"{r['max_num_seqs']:>5} {r['max_num_batched_tokens']:>7} {r['output_tokens_per_s']:>8.1f} "
                     f"{r['ttft_p50_ms']:>9.0f} {r['tpot_p50_ms']:>9.1f} {r['tpot_p99_ms']:>9.1f}")
    b = result["best"]
    if b is None:
        lines.append(f"no setting meets TPOT p99 <= {result['max_tpot_ms']} ms")
    else:
        lines.append(f"best: --max-num-seqs {b['max_num_seqs']} --max-num-batched-tokens "
                     f"{b['max_num_batched_tokens']} ({b['output_tokens_per_s']:.1f} tok/s, "
                     f"TPOT p99 {b['tpot_p99_ms']:.1f} ms)")
    return "\n".join(lines)
