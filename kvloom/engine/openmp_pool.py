"""Hand a process's OpenMP compute to the engine's own thread.

libgomp keeps a pool of worker threads for every thread that has run a parallel region, and counts them
all. Once they outnumber the CPUs it stops spinning at its barriers (about 100 spins, then a futex
sleep), so every parallel region of every step pays thread wake-ups. A server builds the model on its
main thread (whose pool stays behind) and then steps the engine on another: on 2 cores each of its two
compute threads slept and woke 55-64k times in a 48-request burst, and the burst ran 1.15-1.95x faster
once the main thread's pool was gone (benchmarks/serving_threads.py, docs/results/serving_threads/).
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("kvloom.engine")

OMP_PAUSE_HARD = 2   # omp_pause_resource_t: release the threads, not only park them


def _libgomp() -> ctypes.CDLL | None:
    """The libgomp already in the process (PyTorch's), or None: another OpenMP runtime has its own rules."""
    try:
        return ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return None


def _release() -> ctypes.CDLL | None:
    """Release this thread's OpenMP workers; the libgomp that did, or None."""
    gomp = _libgomp()
    if gomp is None or not hasattr(gomp, "omp_pause_resource_all"):   # OpenMP 5.0: libgomp from GCC 9
        log.info("OpenMP: no libgomp that can release its threads here; the thread pools are left as they are")
        return None
    if gomp.omp_pause_resource_all(OMP_PAUSE_HARD) != 0:
        log.warning("OpenMP: this thread's workers could not be released (called inside a parallel region?)")
        return None
    return gomp


def release_openmp_workers() -> bool:
    """Release this thread's OpenMP workers (its next parallel region makes new ones). Returns whether there
    was a libgomp that could."""
    return _release() is not None


def leave_compute_to_engine_thread() -> bool:
    """Release this thread's OpenMP workers and run its own parallel regions (ATen's and the native
    kernels') on one thread from now on. (MKL keeps its own thread count: its few ops would make a pool.)

    Called on the thread that built the engine (a server's event loop, an actor's call thread) once the
    engine steps on its own thread: this thread should do no heavy compute any more, and a pool it built
    again would throttle the engine's. Returns whether there was a libgomp to tell."""
    gomp = _release()
    if gomp is None:
        return False
    gomp.omp_set_num_threads(1)
    return True
