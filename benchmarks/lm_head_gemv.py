"""The LM head's int8 GEMV alone, row-at-a-time loop against the grouped one: `python benchmarks/lm_head_gemv.py OUT.json`.

SmolLM2-135M's head (49,152 x 576 int8, random values: the speed does not depend on them) through the call the
engine makes (w8a8_linear: quantize the activations, int8 product, scale back), without and with the packed
weights (kernels/int8_grouped_gemv.cpp), alternating in one process at 1, 2 and 4 rows. Reports medians and
the best of the rounds, the weight read speed of each, and the median of the per-round ratios.
"""
import json
import statistics
import sys
import time

import torch

from kvloom.kernels import kernels
from kvloom.system_info import save_kernel_result

N, K = 49_152, 576


def main(out: str, rounds: int = 60) -> None:
    k = kernels()
    assert k is not None and k.int8_grouped_gemv_available(), "needs the native kernels with the grouped GEMV"
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    packed, sums = k.int8_pack_row_groups(w)
    scales = torch.rand(N, generator=g)
    results = []
    for rows in (1, 2, 4):
        x = torch.randn(rows, K, generator=g)
        paths = {"row_at_a_time": lambda: k.w8a8_linear(x, w.t(), scales, None),
                 "grouped": lambda: k.w8a8_linear(x, w.t(), scales, None, packed=packed, row_sums=sums)}
        assert torch.equal(paths["row_at_a_time"](), paths["grouped"]())   # same bits
        times = {name: [] for name in paths}
        for _ in range(rounds):
            for name, fn in paths.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        r = {"rows": rows, "same_bits": True}
        for name, ts in times.items():
            med, best = statistics.median(ts), min(ts)
            r[name] = {"median_ms": round(med * 1e3, 3), "best_ms": round(best * 1e3, 3),
                       "median_GBps": round(N * K / med / 1e9, 1), "best_GBps": round(N * K / best / 1e9, 1)}
        r["ratio_median"] = round(statistics.median(a / b for a, b in zip(times["row_at_a_time"], times["grouped"])), 2)
        print(json.dumps(r), flush=True)
        results.append(r)
    save_kernel_result(out, "benchmarks/lm_head_gemv.py", results, rounds=rounds)


if __name__ == "__main__":
    main(sys.argv[1])
