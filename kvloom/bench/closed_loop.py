"""Drive an engine through a set of prompts with at most `concurrency` in flight, timing each request.

A new request starts when one finishes (a closed loop); with concurrency >= len(prompts) every request
arrives at once, as `bench serve --request-rate inf` sends them. Shared by `bench spec` and `kvloom tune`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from kvloom.engine.engine import Engine
from kvloom.sampling_params import SamplingParams


@dataclass
class RequestTimes:
    start: float          # seconds after the run began: when the request was added
    first_token: float
    last_token: float
    num_tokens: int


def run_closed_loop(engine: Engine, prompts: list[list[int]], output_len: int,
                    concurrency: int) -> tuple[float, list[RequestTimes]]:
    """Greedy, exactly output_len tokens each. Returns the wall time and every request's timings."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    pending = list(prompts)
    started: dict[str, float] = {}
    times: dict[str, RequestTimes] = {}
    t0 = time.perf_counter()
    in_flight = 0
    while pending or engine.has_unfinished():
        while pending and in_flight < concurrency:
            started[engine.add_request(pending.pop(0), params)] = time.perf_counter() - t0
            in_flight += 1
        for out in engine.step():
            now = time.perf_counter() - t0
            if out.delta_token_ids:
                t = times.setdefault(out.request_id, RequestTimes(started[out.parent_id], now, now, 0))
                t.last_token, t.num_tokens = now, len(out.token_ids)
            if out.finished:
                in_flight -= 1
    return time.perf_counter() - t0, list(times.values())
