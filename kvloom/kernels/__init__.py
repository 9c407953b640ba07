"""Native CPU kernels (every *.cpp of this folder, one torch extension), built with the machine's C++ compiler.

`make install` / `make install-test` build them right after pip (`python -m kvloom.kernels build`), into
~/.cache/kvloom/kernels/<isa>-<hash>/ (KVLOOM_KERNEL_CACHE overrides the root); the hash covers the sources
and headers, the flags, the torch version and the CPU's instruction-set class, so a changed source, torch or
KVLOOM_ISA gets its own entry. A start that finds no entry compiles it (~90 s, logged as 'compiling native
kernels for <isa> (first start on this machine, ...)'). Builds are serialised across processes by a flock in
the build directory; a build killed half-way leaves nothing that blocks the next start.

KVLOOM_ISA = native (default: -march=native) | avx512_vnni | avx512 | avx2 | baseline caps the class compiled
for, so the sources' `#ifdef __AVX512F__ / #elif defined(__AVX2__)` paths can be chosen on any bigger CPU;
asking for more than the CPU has is an error.

kernels() returns the module, or None only when kernels are turned off on purpose (KVLOOM_NO_KERNELS=1; the
engine does not call it under --no-native-kernels). A build that fails raises KernelBuildError with the
compiler's message. `python -m kvloom.kernels build|check|status` builds, checks, reports.
"""
from __future__ import annotations

import logging
import os
import threading

from kvloom.kernels.build import KernelBuildError, make_plan

__all__ = ["kernels", "kernels_status", "kernels_disabled_by_env", "KernelBuildError"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_module = None
_error: KernelBuildError | None = None
_plan = None           # the plan the module was built from (or the one that failed)


def kernels_disabled_by_env() -> bool:
    return os.environ.get("KVLOOM_NO_KERNELS", "").strip().lower() not in ("", "0", "false", "no", "off")


def kernels():
    """The compiled module; None when native kernels are turned off (KVLOOM_NO_KERNELS=1).
    Raises KernelBuildError when they are wanted but cannot be built or loaded (the same error on every call)."""
    global _module, _error, _plan
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise KernelBuildError(str(_error))
        if kernels_disabled_by_env():
            return None
        from kvloom.kernels import build
        try:
            _plan = make_plan()
            _module = build.load(_plan)
        except KernelBuildError as e:
            _error = e
            raise
        return _module


def kernels_status(native_kernels: bool = True) -> dict:
    """What /server_info and the start-up log say about the kernels; never builds anything.
    `native_kernels`: the engine's setting (False under --no-native-kernels)."""
    from kvloom.kernels import build
    cpu = build.cpu_info()
    status = {"native_kernels": False, "isa": None, "isa_request": build.requested_isa(), "cpu_isa": cpu.isa,
              "cpu_features": list(cpu.features), "build_dir": None, "built": False, "reason": None}
    plan = _plan
    if plan is None:
        try:
            plan = make_plan()
        except KernelBuildError as e:
            status["reason"] = str(e)
    if plan is not None:
        status.update(isa=plan.isa, isa_request=plan.request, build_dir=plan.build_dir, built=plan.built)
    if not native_kernels:
        status["reason"] = "turned off (--no-native-kernels)"
    elif kernels_disabled_by_env():
        status["reason"] = "turned off (KVLOOM_NO_KERNELS=1)"
    elif _module is not None:
        status["native_kernels"] = True
    elif _error is not None:
        status["reason"] = str(_error)[:2000]
    elif status["reason"] is None:
        status["reason"] = "not loaded yet"
    return status
