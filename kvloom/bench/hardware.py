"""What the machine can do (memory bandwidth, matmul rate) and a description of the inference stack."""
from __future__ import annotations

import os
import platform
import time

import torch

import kvloom


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def stack_description() -> dict:
    """The client side of a result: enough to reproduce it."""
    return {"kvloom_version": kvloom.__version__, "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}


def engine_description(engine) -> dict:
    """The server side: model, precision, every scheduler and cache setting."""
    shape = engine.model.shape
    return {
        **stack_description(),
        "model": engine.source.name,
        "parameters": engine.model.num_parameters(),
        "dtype": engine.config.dtype,
        "quantization": engine.config.quantization,
        "kv_cache_dtype": engine.config.kv_cache_dtype,
        "engine_config": {k: v for k, v in vars(engine.config).items()},
        "max_model_len": engine.max_model_len,
        "kv_cache_blocks": engine.num_blocks,
        "kv_cache_tokens": engine.kv_capacity_tokens,
        "num_layers": shape.num_layers,
    }
