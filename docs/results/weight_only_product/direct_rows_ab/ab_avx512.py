import sys, time, statistics; sys.path.insert(0, "/tmp/wol2"); sys.path.insert(0, "/work/main")
from load import mod
import torch
from kvloom.quant.int8_linear import quantize_per_channel_int8
from kvloom.quant.weight_panels import panels, padded_columns
a = mod("/work/main/kvloom/kernels/weight_only_linear.cpp", "wo_base")
b = mod("/tmp/wol2/weight_only_linear.cpp", "wo_direct8")
torch.set_num_threads(2)
for (N, K) in [(3072, 576), (49152, 576)]:
    w = torch.randn(N, K); q, s = quantize_per_channel_int8(w); P, S = panels(q), padded_columns(s)
    for M in (5, 8):
        x = torch.randn(M, K)
        assert torch.equal(a.int8_weight_linear(x, P, S, N, None), b.int8_weight_linear(x, P, S, N, None))
        r = []
        for _ in range(7):
            ts = []
            for m in (a, b):
                t0 = time.perf_counter()
                for _ in range(20): m.int8_weight_linear(x, P, S, N, None)
                ts.append(time.perf_counter() - t0)
            r.append(ts[0] / ts[1])
        print(N, K, M, "direct-8 speedup (median of 7 pairs):", round(statistics.median(r), 2), [round(v, 2) for v in r])
