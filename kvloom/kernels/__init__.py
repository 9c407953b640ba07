"""Native CPU kernels, compiled on first use with the machine's C++ compiler.

torch.utils.cpp_extension builds them once into its cache (~/.cache/torch_extensions,
keyed by the source), so only the first start on a machine pays the ~30 s.
Without a compiler, or with KVLOOM_NO_KERNELS=1, kernels() returns None and
the engine runs the same computation in plain PyTorch.
"""
from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

_lock = threading.Lock()
_module = None
_tried = False


def kernels():
    """The compiled module, or None when native kernels are off or cannot be built here."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("KVLOOM_NO_KERNELS"):
            return None
        try:
            from torch.utils.cpp_extension import load
            here = os.path.dirname(__file__)
            src = [os.path.join(here, f) for f in ("paged_decode_attention.cpp", "decode_attention_avx512.cpp", "w8a8_linear.cpp",
                                                    "layer_ops.cpp", "decode_stack.cpp",
                                                    "bindings.cpp")]
            log.info("loading native kernels (compiled on the first run on this machine)")
            # -fopenmp: at::parallel_for is inline OpenMP code; without it the kernel runs on one thread.
            _module = load("kvloom_kernels", src, extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"])
        except Exception as e:  # noqa: BLE001 - any build failure means: run without
            log.warning("native kernels unavailable (%s); using the PyTorch path", e)
            _module = None
        return _module
