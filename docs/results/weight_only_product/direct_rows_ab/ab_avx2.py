import os, sys, time, statistics; sys.path.insert(0, "/work/main")
from torch.utils.cpp_extension import load
import torch
from kvloom.quant.int8_linear import quantize_per_channel_int8
from kvloom.quant.int4_linear import quantize_groupwise_int4
from kvloom.quant.weight_panels import panels, padded_columns, int4_panels
def mod(src, name):
    d = f"/tmp/wol2/build_{name}"; os.makedirs(d, exist_ok=True)
    return load(name=name, sources=["/tmp/wol2/bind4.cpp", src], extra_include_paths=["/work/main/kvloom/kernels"],
                extra_cflags=["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c"], extra_ldflags=["-fopenmp"], build_directory=d)
a = mod("/work/main/kvloom/kernels/weight_only_linear.cpp", "wo_base_avx2")
b = mod("/tmp/wol2/wo_avx2_direct6.cpp", "wo_direct6_avx2")
torch.set_num_threads(2)
for (N, K) in [(3072, 576), (49152, 576)]:
    w = torch.randn(N, K); q, s = quantize_per_channel_int8(w); P, S = panels(q), padded_columns(s)
    q4, sc, z = quantize_groupwise_int4(w, 32); P4, SC, OF = int4_panels(q4), panels(sc), panels(z - 8 * sc)
    for M in (5, 6):
        x = torch.randn(M, K)
        for kind, f in (("int8", lambda m: m.int8_weight_linear(x, P, S, N, None)),
                        ("int4", lambda m: m.int4_weight_linear(x, P4, SC, OF, 32, N, None))):
            assert torch.equal(f(a), f(b))
            r = []
            for _ in range(7):
                ts = []
                for m in (a, b):
                    t0 = time.perf_counter()
                    for _ in range(20): f(m)
                    ts.append(time.perf_counter() - t0)
                r.append(ts[0] / ts[1])
            print(N, K, M, kind, "direct-6 speedup:", round(statistics.median(r), 2), [round(v, 2) for v in r])
