"""The weight-only modes' product alone against float32 and PyTorch's weight-only kernels:
`python benchmarks/weight_only_product.py OUT.json [ROUNDS]`.

On the default model's shapes (qkv, gate/up, down, the 49,152 x 576 head) at 1, 8 and 512 rows, 2 threads:
float32 `F.linear`, the native int8 and 4-bit products (kernels/weight_only_linear.cpp, through the modules'
weight panels), and PyTorch's `_weight_int8pack_mm` (what the int8 mode called before). The four run in turn
within each round; medians over the rounds, and the median per-round ratio to float32. For an AVX2-only host's
paths, run it with KVLOOM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 (PyTorch's kernels capped too).
"""
import statistics
import sys
import time

import torch

from kvloom.kernels import kernels
from kvloom.quant.int4_linear import quantize_groupwise_int4
from kvloom.quant.int8_linear import quantize_per_channel_int8
from kvloom.quant.weight_panels import int4_panels, padded_columns, panels
from kvloom.system_info import save_kernel_result

SHAPES = [(960, 576), (3072, 576), (576, 1536), (49_152, 576)]   # (out, in)
ROWS = (1, 8, 512)


def _seconds(f, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t0) / calls


def main(out: str, rounds: int = 5) -> None:
    k = kernels()
    assert k is not None, "needs the native kernels"
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    results = []
    for n, kin in SHAPES:
        w = torch.randn(n, kin, generator=g)
        q8, s8 = quantize_per_channel_int8(w)
        q4, scale, zero = quantize_groupwise_int4(w, 32)
        p8, c8 = panels(q8), padded_columns(s8)
        p4, sc4, of4 = int4_panels(q4), panels(scale), panels(zero - 8.0 * scale)
        for m in ROWS:
            x = torch.randn(m, kin, generator=g)
            arms = {"float32": lambda: torch.nn.functional.linear(x, w),
                    "int8_native": lambda: k.int8_weight_linear(x, p8, c8, n, None),
                    "int4_native": lambda: k.int4_weight_linear(x, p4, sc4, of4, 32, n, None),
                    "int8_torch": lambda: torch._weight_int8pack_mm(x, q8, s8)}
            flops = 2 * m * n * kin
            calls = max(1, int(2e9 // (flops * 20))) if m > 1 else 50   # ~0.1 s of float32 work a round
            times = {a: [] for a in arms}
            for f in arms.values():
                f()   # warm-up
            for _ in range(rounds):
                for a, f in arms.items():
                    times[a].append(_seconds(f, 1 if a == "int8_torch" and m > 1 else calls))
            row = {"out": n, "in": kin, "rows": m,
                   **{f"{a}_ms": round(statistics.median(t) * 1e3, 4) for a, t in times.items()},
                   **{f"{a}_vs_float32": round(statistics.median(f32 / t for f32, t in zip(times["float32"], ts)), 2)
                      for a, ts in times.items() if a != "float32"}}
            results.append(row)
            print(row, flush=True)
    save_kernel_result(out, "benchmarks/weight_only_product.py", results, rounds=rounds,
                       aten_capability=torch.backends.cpu.get_cpu_capability(),
                       weight_only_path=k.weight_only_path())


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
