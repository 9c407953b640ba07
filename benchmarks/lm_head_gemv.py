"""The LM head's int8 product alone, the build's plain loop against the grouped one:
`python benchmarks/lm_head_gemv.py OUT.json [ROWS,ROWS,...]` (rows: default 1,2,4).

SmolLM2-135M's head (49,152 x 576 int8, random values: the speed does not depend on them) through the call the
engine makes (w8a8_linear: quantize the activations, int8 product, scale back), without and with the packed
weights (kernels/int8_grouped_gemv.cpp), alternating in one process. Reports medians and the best of the
rounds, the weight read speed of each, and the median of the per-round ratios. Past the grouped loop's rows
(4 on VNNI builds) both columns run the plain loop. For an AVX2-only host's paths, run it with
KVLOOM_ISA=avx2 DNNL_MAX_CPU_ISA=AVX2 (oneDNN capped too).
"""
import json
import statistics
import sys
import time

import torch

from kvloom.kernels import kernels
from kvloom.system_info import save_kernel_result

N, K = 49_152, 576


def main(out: str, rows_list: tuple = (1, 2, 4), rounds: int = 60) -> None:
    k = kernels()
    assert k is not None and k.int8_grouped_gemv_available(), "needs the native kernels with the grouped GEMV"
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    packed, sums = k.int8_pack_row_groups(w)
    scales = torch.rand(N, generator=g)
    results = []
    for rows in rows_list:
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
    save_kernel_result(out, "benchmarks/lm_head_gemv.py", results, rounds=rounds, grouped_path=k.int8_grouped_path(),
                       plain_path=k.int8_gemm_path())


if __name__ == "__main__":
    main(sys.argv[1], tuple(int(r) for r in sys.argv[2].split(",")) if len(sys.argv) > 2 else (1, 2, 4))
