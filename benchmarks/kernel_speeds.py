"""The native kernels alone: `python benchmarks/kernel_speeds.py [--isa avx2] [--only gemm]`.

--isa     the class to build and time (native, avx2, avx512, avx512_vnni, baseline; default native: the
          engine's build); --only attention|linears|gemm runs one section.

decode attention  KV read speed over the float32 and the float16 pool for a few (sequences, context)
                  shapes, each call over one of four layers' pools (50 / 25 MB each, so the KV comes from
                  memory, not cache); blocks scattered at random as a long-running pool leaves them.
int8 products     GOP/s of the int32 product alone on SmolLM2-135M's shapes (576 -> 960 q/k/v, 576 -> 576 o,
                  576 -> 3072 gate/up, 1536 -> 576 down, 576 -> 49152 head) at 1, 4, 16 rows (decode GEMV)
                  and 128, 512 (prefill GEMM): the build's own loop (`native`: its loop at any row count;
                  `auto`: what w8a8 uses), oneDNN's torch._int_mm, and fp32 torch.matmul for scale.
w8a8 linear       SmolLM2-135M's 121 linears (30 layers x 4, and the LM head) at 1-16 rows: the
                  native call (VNNI GEMV up to 16 rows) against the PyTorch path (quantize, oneDNN's
                  `_int_mm`, rescale).
prefill           what a 512-token prompt spends its time in: the 4-bit product (w4a8) on the layer shapes
                  at 512 rows, in GMAC/s, and one layer's causal attention (512 rows, row i over i + 1
                  positions, 9 query heads on 3 KV heads), in ms and GMAC/s.
"""
import argparse
import time

import torch

from kvloom.kernels import build, kernels
from kvloom.quant.q4_linear import Q4Linear
from kvloom.quant.w8a8_linear import W8A8Linear

SHAPES = {"qkv 576->960": (960, 576), "o 576->576": (576, 576), "gate_up 576->3072": (3072, 576),
          "down 1536->576": (576, 1536), "head 576->49152": (49152, 576)}


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def attention(native) -> None:
    num_blocks, kvh, bs, d, heads = 4096, 3, 16, 64, 9
    pools = {torch.float32: [(torch.randn(num_blocks, kvh, bs, d), torch.randn(num_blocks, kvh, bs, d))
                             for _ in range(4)]}
    pools[torch.float16] = [(k.half(), v.half()) for k, v in pools[torch.float32]]
    for n, ctx in ((1, 200), (32, 200), (48, 164), (64, 200), (32, 1000)):
        width = -(-ctx // bs)
        tables = torch.randperm(num_blocks)[: n * width].view(n, width)
        lens, q = torch.full((n,), ctx), torch.randn(n, heads, d)
        per_layer = {}
        for dtype, layers in pools.items():
            def run():
                for k, v in layers:
                    native.decode_attention_f32(q, k, v, tables, lens, 0.125)
            per_layer[dtype] = best_of(run, 20) / len(layers)
        line = []
        for dtype, seconds in per_layer.items():
            read = n * ctx * kvh * d * dtype.itemsize * 2
            line.append(f"{str(dtype)[6:]} {seconds * 1e3:6.3f} ms a layer, {read / seconds / 1e9:5.1f} GB/s")
        print(f"attention  {n:3d} x {ctx:4d} tokens: {'; '.join(line)}; "
              f"float16 pool {per_layer[torch.float32] / per_layer[torch.float16]:.2f}x")


def gemm(native) -> None:
    """GOP/s (2 * M * N * K / s) of the int8 product by each loop, and fp32 matmul, per shape and row count."""
    torch.manual_seed(0)
    print(f"int8 products, build {native.isa()}: auto = {native.int8_gemm_path()}")
    print(f"{'shape':18s} {'rows':>4s} {'native':>8s} {'auto':>8s} {'_int_mm':>8s} {'fp32':>8s}   GOP/s (GFLOP/s)")
    for name, (n, k) in SHAPES.items():
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        wf = torch.randn(n, k)
        for rows in (1, 4, 16, 128, 512):
            if name.startswith("head") and rows > 128:
                continue
            x8, xf = torch.randint(-127, 128, (rows, k), dtype=torch.int8), torch.randn(rows, k)
            ops = 2 * rows * n * k
            reps = max(3, min(50, int(2e9 / ops)))
            runs = {"native": lambda: native.int8_matmul(x8, w8.t(), "native"),
                    "auto": lambda: native.int8_matmul(x8, w8.t(), "auto"),
                    # oneDNN wants more than 16 rows; below, pad to 17 (counted as the rows asked for)
                    "_int_mm": (lambda: torch._int_mm(x8, w8.t())) if rows > 16 else
                    (lambda x17=torch.cat((x8, x8.new_zeros(17 - rows, k))): torch._int_mm(x17, w8.t())),
                    "fp32": lambda: torch.matmul(xf, wf.t())}
            cells = []
            for fn in runs.values():
                fn()
                cells.append(f"{ops / best_of(fn, reps) / 1e9:8.1f}")
            print(f"{name:18s} {rows:4d} {' '.join(cells)}")


def linears(native) -> None:
    torch.manual_seed(0)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
    fused = [W8A8Linear(torch.randn(o, i) / 8, None, native=True) for o, i in shapes]
    plain = [W8A8Linear(lin.weight.float(), None, native=False) for lin in fused]
    for plain_lin, lin in zip(plain, fused):   # the same int8 weights both ways
        plain_lin.weight, plain_lin.scales = lin.weight, lin.scales
    weight_bytes = sum(lin.weight.numel() for lin in fused)
    for rows in (1, 2, 4, 8, 16):
        xs = {k: torch.randn(rows, k) for k in (576, 1536)}
        times = [best_of(lambda: [native.w8a8_linear(xs[lin.in_features], lin.weight.t(), lin.scales, None)
                                  for lin in fused], 5),
                 best_of(lambda: [lin(xs[lin.in_features]) for lin in plain], 5)]
        print(f"w8a8 linears, {rows:2d} rows: native {times[0] * 1e3:6.2f} ms ({weight_bytes / times[0] / 1e9:4.1f} GB/s), "
              f"PyTorch path {times[1] * 1e3:6.2f} ms")


def prefill(native) -> None:
    torch.manual_seed(0)
    print(f"prefill, build {native.isa()}: {native.q4_gemm_path()}")
    rows, total_macs, total_s = 512, 0, 0.0
    for name, (n, k) in list(SHAPES.items())[:4]:   # the layers, not the LM head (one row in a prefill)
        lin = Q4Linear(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8),
                       (torch.rand(n, 2, k // 32) / 100).half().float(), None)
        x = torch.randn(rows, k)
        seconds = best_of(lambda: native.q4_linear(x, lin.qs, lin.scales, n, None, None), 10)
        total_macs, total_s = total_macs + rows * n * k, total_s + seconds
        print(f"w4a8 {name:18s} {rows} rows: {seconds * 1e3:6.2f} ms, {rows * n * k / seconds / 1e9:6.1f} GMAC/s")
    print(f"w4a8 the four layer shapes: {total_macs / total_s / 1e9:6.1f} GMAC/s")
    kvh, bs, d, heads = 3, 16, 64, 9
    k, v = torch.randn(64, kvh, bs, d), torch.randn(64, kvh, bs, d)
    tables = torch.randperm(64)[: rows // bs].repeat(rows, 1).contiguous()
    lens, q = torch.arange(1, rows + 1), torch.randn(rows, heads, d)
    seconds = best_of(lambda: native.decode_attention_f32(q, k, v, tables, lens, 0.125, None), 20)
    macs = rows * (rows + 1) / 2 * heads * d * 2
    print(f"causal attention, {rows} rows, one layer: {seconds * 1e3:6.3f} ms, {macs / seconds / 1e9:6.1f} GMAC/s")


def module_for(isa: str):
    return kernels() if isa == "native" else build.load(build.make_plan(isa))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--isa", default="native", help="native | avx512_vnni | avx512 | avx2 | baseline")
    p.add_argument("--only", choices=["attention", "gemm", "linears", "prefill"], default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    module = module_for(args.isa)
    for section in (attention, gemm, linears, prefill):
        if args.only in (None, section.__name__):
            section(module)
