"""The native kernels alone: `python benchmarks/kernel_speeds.py`.

decode attention  KV read speed over the float pool for a few (sequences, context) shapes, each call
                  over one of four layers' pools (41 MB each, so the KV comes from memory, not cache);
                  blocks scattered at random as a long-running pool leaves them.
w8a8 linear       SmolLM2-135M's 121 linears (30 layers x 4, and the LM head) at 1-16 rows: the
                  native call (VNNI GEMV up to 16 rows) against the PyTorch path (quantize, oneDNN's
                  `_int_mm`, rescale).
"""
import time

import torch

from kvloom.kernels import kernels
from kvloom.quant.w8a8_linear import W8A8Linear


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def attention() -> None:
    native = kernels()
    num_blocks, kvh, bs, d, heads = 4096, 3, 16, 64, 9
    pools = [(torch.randn(num_blocks, kvh, bs, d), torch.randn(num_blocks, kvh, bs, d)) for _ in range(4)]
    for n, ctx in ((1, 200), (32, 200), (64, 200), (32, 1000)):
        width = -(-ctx // bs)
        tables = torch.randperm(num_blocks)[: n * width].view(n, width)
        lens, q = torch.full((n,), ctx), torch.randn(n, heads, d)

        def run():
            for k, v in pools:
                native.decode_attention_f32(q, k, v, tables, lens, 0.125)
        per_layer = best_of(run, 20) / len(pools)
        read = n * ctx * kvh * d * 4 * 2
        print(f"attention  {n:3d} x {ctx:4d} tokens: {per_layer * 1e3:6.3f} ms a layer, {read / per_layer / 1e9:5.1f} GB/s")


def linears() -> None:
    torch.manual_seed(0)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
    fused = [W8A8Linear(torch.randn(o, i) / 8, None, native=True) for o, i in shapes]
    plain = [W8A8Linear(lin.weight.float(), None, native=False) for lin in fused]
    for plain_lin, lin in zip(plain, fused):   # the same int8 weights both ways
        plain_lin.weight, plain_lin.scales = lin.weight, lin.scales
    weight_bytes = sum(lin.weight.numel() for lin in fused)
    for rows in (1, 2, 4, 8, 16):
        xs = {k: torch.randn(rows, k) for k in (576, 1536)}
        times = [best_of(lambda: [lin(xs[lin.in_features]) for lin in layers], 5) for layers in (fused, plain)]
        print(f"w8a8 linears, {rows:2d} rows: native {times[0] * 1e3:6.2f} ms ({weight_bytes / times[0] / 1e9:4.1f} GB/s), "
              f"PyTorch path {times[1] * 1e3:6.2f} ms")


if __name__ == "__main__":
    torch.set_num_threads(2)
    attention()
    linears()
