"""What the multi-model front and a router add to a request's latency, in-process A/B alternation: the same
request to (a) the single-model server, (b) the multi-model front naming the model, (c) the front with
model "auto" (a bandit route). Every server runs the default model; writes docs/results/router/overhead.json.

    python benchmarks/router_overhead.py [--rounds 30]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import httpx  # noqa: E402

from kvloom.config import EngineConfig  # noqa: E402
from kvloom.engine.engine import Engine  # noqa: E402
from kvloom.kernels.build import cpu_info  # noqa: E402
from kvloom.system_info import stack_description  # noqa: E402
from server_harness import MultiServerThread, ServerThread  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--out", default="docs/results/router")
    args = ap.parse_args()
    body = {"prompt": "What is 3 + 4? Reply with the number only.", "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True}
    single = ServerThread(Engine(EngineConfig(kv_cache_memory=64 << 20)), name="m")
    multi = MultiServerThread({"small": None, "big": None}, num_threads=None)
    kinds = {"single-model server": (single, "m"), "front, model named": (multi, "small"),
             "front, model auto (bandit)": (multi, "auto")}
    times = {k: [] for k in kinds}
    with single, multi, httpx.Client(timeout=60) as client:
        for s, name in kinds.values():     # warm-up; loads big on the front as well
            client.post(s.url + "/v1/completions", json={**body, "model": name})
        client.post(multi.url + "/v1/completions", json={**body, "model": "big"})
        for _ in range(args.rounds):
            for k, (s, name) in kinds.items():
                started = time.perf_counter()
                r = client.post(s.url + "/v1/completions", json={**body, "model": name})
                times[k].append(time.perf_counter() - started)
                assert r.status_code == 200, r.text
    base = statistics.median(times["single-model server"])
    result = {"command": "python benchmarks/router_overhead.py " + " ".join(sys.argv[1:]),
              "rounds": args.rounds, "max_tokens": args.max_tokens,
              "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
              "added_ms_vs_single": {k: (statistics.median(v) - base) * 1e3 for k, v in times.items()},
              "cpu_class": cpu_info().isa, "stack": stack_description(),
              "note": "medians of alternating requests on a 2-core machine shared with other jobs: noisy"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "overhead.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["median_ms"], indent=1), json.dumps(result["added_ms_vs_single"], indent=1))


if __name__ == "__main__":
    main()
