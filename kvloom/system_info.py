"""What a result or a running server says about itself: versions, CPU, and the engine's active paths."""
from __future__ import annotations

import os
import platform

import torch

import kvloom
from kvloom.kernels import kernels_status


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stack_description() -> dict:
    """The client side of a result: enough to reproduce it."""
    return {"kvloom_version": kvloom.__version__, "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}


def save_kernel_result(path: str, script: str, results: list, **fields) -> None:
    """A native-kernel benchmark's result file: its command (the script with this process's arguments), the
    CPU class of the kernels it ran, the stack, `fields` and the results."""
    import json
    import sys
    status = kernels_status()
    with open(path, "w") as f:
        json.dump({"command": " ".join(["python", script, *sys.argv[1:]]), "cpu_class": status["isa"],
                   "cpu_isa": status["cpu_isa"], "isa_request": status["isa_request"], "stack": stack_description(),
                   **fields, "results": results}, f, indent=1)


def engine_description(engine) -> dict:
    """The server side: model, precision, every scheduler and cache setting."""
    shape = engine.model.shape
    return {
        **stack_description(),
        "torch_threads": engine.compute_threads,
        "inference_paths": inference_paths(engine),
        "model": engine.source.name,
        "parameters": engine.model.num_parameters(),
        "dtype": engine.config.dtype,
        "quantization": engine.config.quantization,
        "kv_cache_dtype": engine.config.kv_cache_dtype,
        "engine_config": {k: v for k, v in vars(engine.config).items()},
        "tpot_target": None if getattr(engine, "tpot", None) is None else engine.tpot.describe(),
        "max_model_len": engine.max_model_len,
        "kv_cache_blocks": engine.num_blocks,
        "kv_cache_tokens": engine.kv_capacity_tokens,
        "kv_cache_window_release": _window_release(engine),
        "num_layers": shape.num_layers,
    }


def _window_release(engine) -> dict | None:
    """For a model with sliding-window layers: whether their KV is released behind the window, and if not why."""
    groups = engine.layer_groups
    if groups is None:
        return None if engine.window_kv_why is None else {"active": False, "why": engine.window_kv_why}
    return {"active": True, "layers_per_page": groups.size, "sliding_groups": groups.num_sliding_groups,
            "pages_per_block_in_window": 1 + groups.num_sliding_groups, "kv_cache_pages": engine.num_blocks}


def inference_paths(engine) -> dict:
    """Which native paths run (kernels, ISA class, attention backends, linear kernels) and, for each off, why."""
    kernels = kernels_status(native_kernels=engine.config.native_kernels)
    linears = sorted({_linear_path(m) for m in engine.model.modules() if _linear_path(m) is not None})
    return {"kernels": kernels, **engine.runner.describe_backends(), "linear_kernels": linears,
            "embedding": _embedding_path(engine.model.embed_tokens)}


def _embedding_path(table) -> str:
    from kvloom.quant.block_embedding import BlockEmbedding
    if isinstance(table, BlockEmbedding):
        return f"{table.type.name} blocks as the file stores them, rows dequantised per lookup"
    return f"{str(table.weight.dtype).removeprefix('torch.')} table"


def _linear_path(module) -> str | None:
    from kvloom.models.moe import GroupedExperts
    from kvloom.quant.int4_linear import Int4Linear
    from kvloom.quant.int8_linear import Int8Linear
    from kvloom.quant.q4_linear import Q4Linear
    from kvloom.quant.w8a8_linear import W8A8Linear
    if isinstance(module, Q4Linear):
        return f"{'/'.join(module.source_types)} blocks x int8: {module.gemm_path}"
    if isinstance(module, W8A8Linear):
        return f"w8a8: {module.gemm_path}"
    if isinstance(module, Int8Linear):
        return f"int8 weight-only: {module.gemm_path}"
    if isinstance(module, Int4Linear):
        return f"int4 weight-only: {module.gemm_path}"
    if type(module) is torch.nn.Linear:
        return f"{str(module.weight.dtype).removeprefix('torch.')}: torch linear"
    if isinstance(module, GroupedExperts):
        return (f"{str(module.gate_up_proj.dtype).removeprefix('torch.')} experts: tokens grouped by expert, "
                "torch linear per active expert")
    return None
