"""The 4-bit product over weights that are not in cache, as a decode step meets them:
`python benchmarks/q4_cold_weights.py OUT.json [ROWS,ROWS,...]` (rows: default 1,4,16,48,128,512).

36 copies of SmolLM2-135M's fused gate/up projection (3072 x 576, Q4_1-style blocks with float16 scales: 40 MB,
past the caches) run one after another, as the 30 layers of a step do. Per row count: the best and median of
the rounds' time a call, and the weight bytes read a second at the best. With 2 threads unless
KVLOOM_THREADS says otherwise. To compare two trees, run it from each with PYTHONPATH set to the tree, in
turn (benchmarks/q4_cold_pairs.sh does that).
"""
import os
import statistics
import sys
import time

import torch

from kvloom.kernels import kernels
from kvloom.system_info import save_kernel_result

N, K, COPIES = 3072, 576, 36


def main(out: str, rows_list: tuple = (1, 4, 16, 48, 128, 512), rounds: int = 7) -> None:
    k = kernels()
    assert k is not None, "needs the native kernels"
    threads = int(os.environ.get("KVLOOM_THREADS", "2"))
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randint(0, 256, (N // 8, K // 32, 128), generator=g, dtype=torch.uint8),
                torch.randn(N // 8, K // 32, 2, 8, generator=g).half()) for _ in range(COPIES)]
    nbytes = weights[0][0].numel() + 2 * weights[0][1].numel()
    results = []
    for rows in rows_list:
        x = torch.randn(rows, K, generator=g)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            for qs, scales in weights:
                k.q4_linear(x, qs, scales, N, None, None)
            times.append((time.perf_counter() - t) / COPIES)
        best = min(times)
        results.append({"rows": rows, "best_us": round(best * 1e6, 1),
                        "median_us": round(statistics.median(times) * 1e6, 1),
                        "weight_gb_s_at_best": round(nbytes / best / 1e9, 1)})
        print(f"{rows:4d} rows: best {best * 1e6:7.1f} us a call, {nbytes / best / 1e9:5.1f} GB/s of weights")
    save_kernel_result(out, __file__, results, threads=threads, shape=[N, K], copies=COPIES,
                       megabytes=round(COPIES * nbytes / 1e6, 1))


if __name__ == "__main__":
    main(sys.argv[1], tuple(int(r) for r in sys.argv[2].split(",")) if len(sys.argv) > 2 else
         (1, 4, 16, 48, 128, 512))
