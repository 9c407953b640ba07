"""What the machine can do: memory bandwidth and matmul rate (descriptions of the stack: kvloom/system_info.py)."""
from __future__ import annotations

import time

import torch


def measure_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of several full passes summing a buffer far larger than the caches."""
    x = torch.ones(size_mb * (1 << 20) // 4, dtype=torch.float32)
    x.sum()  # touch once
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def measure_matmul_gflops(n: int = 1024, repeats: int = 5, dtype=torch.float32) -> float:
    """Peak-ish matmul rate: the best of several square n x n products."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9
